"""The Hydra configs: every option composes and plans, and every config error is named before a model loads."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_train
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

import eopd.models
import eopd.plan
import eopd.train
import eopd.trainer_options
from eopd.objectives import PRESETS, Objective
from eopd.rollout_engines import vllm_available
from eopd.schedules import Constant, Cosine, Linear, Step
from eopd.train import ConfigError, plan

CONF_DIR = Path(eopd.train.CONF_DIR)
REPO = CONF_DIR.parent
GROUPS = sorted(d.name for d in CONF_DIR.iterdir() if d.is_dir() and d.name != "hydra")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


# ---- every option composes ----------------------------------------------------------------------------


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_has_an_option(group):
    assert options(group), f"conf/{group}/ has no option file"


@pytest.mark.parametrize(
    ("group", "option"), [pytest.param(g, o, id=f"{g}={o}") for g in GROUPS for o in options(g)]
)
def test_option_composes_and_plans(group, option, tmp_path, monkeypatch, math_files):
    # Real pairs name hub ids, which are not downloaded offline: planning checks the config, not the cache.
    monkeypatch.setattr(eopd.models, "_in_hub_cache", lambda repo_id: True)
    cfg = compose_train([f"{group}={option}"])
    local = local_math_files(cfg, math_files)  # the hub is offline in tests
    if (
        OmegaConf.select(cfg, "pair.teacher.gguf") is not None
    ):  # its wheel may not be installed: any file will do
        (tmp_path / "teacher.gguf").write_bytes(b"GGUF")
        local.append(f"pair.teacher.gguf.path={tmp_path / 'teacher.gguf'}")
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="trainer.accelerator"):
            plan(compose_train([f"{group}={option}", *local]), tmp_path / "run")
        local += ["trainer.accelerator=cpu", "trainer.precision=32-true"]
        cfg = compose_train([f"{group}={option}", *local])
    if cfg.rollout.engine == "vllm" and not (vllm_available() and torch.cuda.is_available()):
        with pytest.raises(ConfigError, match="rollout.engine"):
            plan(compose_train([f"{group}={option}", *local]), tmp_path / "run")
        local += ["rollout.engine=hf", "~rollout.engine_options"]
    cfg = compose_train([f"{group}={option}", *local])

    p = plan(cfg, tmp_path / "run")

    assert isinstance(p.objective, Objective)
    assert p.records["train"], "no training prompts"
    # Schedules span ${total_optimizer_steps}: it must be the number of steps the trainer runs.
    assert p.max_steps == cfg.total_optimizer_steps


def local_math_files(cfg: DictConfig, math_files: dict) -> list[str]:
    """Overrides that point a config's math data and benchmarks at the local files of `math_files`."""
    overrides = []
    if cfg.data.source == "math":  # the file's fields: problem, answer
        fields = ["data.prompt_field=problem", "data.answer_field=answer", "data.answer_from_boxed=false"]
        overrides += [f"data.path={math_files['train']}", *fields]
    return overrides + [
        f"eval.benchmarks.{name}.path={math_files['benchmarks'][name]}" for name in cfg.eval.benchmarks
    ]


def test_every_preset_has_an_objective_option():
    assert set(options("objective")) == set(PRESETS)


@pytest.mark.parametrize("name", options("objective"))
def test_objective_option_overlays_the_shared_base_and_states_only_its_name(name):
    base = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "objective" / "base" / "paper.yaml"))
    own = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "objective" / f"{name}.yaml"))
    own.pop("defaults")
    assert own == {"name": name}, f"conf/objective/{name}.yaml restates what the base already says"

    composed = OmegaConf.to_container(compose_train([f"objective={name}"]).objective)
    assert composed == {**base, "name": name}


def test_the_evaluation_high_entropy_split_is_the_training_diagnostics_one():
    cfg = compose_train(["objective.diagnostic_tau=1.1"])
    assert cfg.eval.tau == cfg.objective.diagnostic_tau == 1.1


@pytest.mark.parametrize("name", options("objective"))
def test_objective_option_builds_the_preset_of_its_name(name, tmp_path):
    objective = plan(compose_train([f"objective={name}"]), tmp_path / "run").objective

    assert objective.name == name


def _forward_kl_term(objective: Objective):
    return next(t for t in objective.terms if t.kind == "topk_fkl")


def _check_constant(term, steps):
    assert term.weight == Constant(1.0)
    assert term.gate.tau == Constant(0.8)


def _check_alpha_decay(kind):
    def check(term, steps):
        assert isinstance(term.weight, kind)
        assert term.weight(0) == pytest.approx(1.0)
        assert term.weight(steps) == pytest.approx(0.0)  # decays over exactly the run's optimizer steps
        assert term.weight(steps // 2) == pytest.approx(0.5)
        assert term.gate.tau == Constant(0.8)

    return check


def _check_tau_step(term, steps):
    assert isinstance(term.gate.tau, Step)
    assert term.gate.tau(0) == pytest.approx(1.2)
    assert term.gate.tau(steps // 2 - 1) == pytest.approx(1.2)
    assert term.gate.tau(steps // 2) == pytest.approx(0.8)
    assert term.weight == Constant(1.0)


SCHEDULE_CHECKS = {
    "constant": _check_constant,
    "alpha_linear_decay": _check_alpha_decay(Linear),
    "alpha_cosine_decay": _check_alpha_decay(Cosine),
    "tau_step": _check_tau_step,
}


@pytest.mark.parametrize("schedule", options("schedule"))
def test_schedule_reaches_the_eopd_forward_kl_term(schedule, tmp_path):
    assert schedule in SCHEDULE_CHECKS, f"add what conf/schedule/{schedule}.yaml should do to SCHEDULE_CHECKS"
    cfg = compose_train(["objective=eopd", f"schedule={schedule}"])

    p = plan(cfg, tmp_path / "run")

    SCHEDULE_CHECKS[schedule](_forward_kl_term(p.objective), p.max_steps)


# ---- experiments and sweeps ----------------------------------------------------------------------------


def _leaves(node: dict, prefix: str = ""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _at(node: dict, dotted: str):
    for part in dotted.split("."):
        node = node[part]
    return node


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiment_overlays_the_defaults_and_the_command_line_wins(experiment):
    overlay = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "experiment" / f"{experiment}.yaml"))

    composed = OmegaConf.to_container(compose_train([f"experiment={experiment}"]))
    overlay.pop("defaults", None)  # the groups it selects; their own files are tested elsewhere
    for key, value in _leaves(overlay):
        assert _at(composed, key) == value, f"experiment={experiment} did not set {key}"

    assert compose_train([f"experiment={experiment}", "rollout_steps=2"]).rollout_steps == 2


@pytest.mark.parametrize("sweep", options("sweep"))
def test_sweep_is_a_multirun_over_options_that_exist(sweep, tmp_path):
    cfg = compose_train([f"sweep={sweep}"], hydra_node=True)

    assert cfg.hydra.mode == RunMode.MULTIRUN
    assert cfg.group, "a sweep names its group: the sweep directory and the wandb group"
    params = cfg.hydra.sweeper.params
    assert params, "hydra.sweeper.params is empty"
    parser = OverridesParser.create()
    grid = {}
    for key, values in params.items():
        override = parser.parse_override(f"{key}={values}")
        if override.is_interval_sweep():  # an Optuna search range: check its ends
            bounds = override.value()
            grid[key] = [str(bounds.start), str(bounds.end)]
        else:
            grid[key] = list(override.sweep_string_iterator())
        if key in GROUPS:
            unknown = set(grid[key]) - set(options(key))
            assert not unknown, f"sweep {sweep} names {key} options that do not exist: {sorted(unknown)}"
        else:
            assert OmegaConf.select(cfg, key) is not None, f"sweep {sweep} sweeps {key}, not a config key"

    # Every job of the grid composes and plans (objective presets build, seeds apply).
    for combination in itertools.product(*grid.values()):
        overrides = [f"{key}={value}" for key, value in zip(grid, combination, strict=True)]
        job = compose_train([f"sweep={sweep}", *overrides])
        job_plan = plan(job, tmp_path / "run")
        for key, value in zip(grid, combination, strict=True):
            if key == "objective":
                assert job_plan.objective.name == value
            elif key not in GROUPS:
                assert str(OmegaConf.select(job, key)) == value


# ---- launchers -----------------------------------------------------------------------------------------

LAUNCHERS = sorted(p.stem for p in (CONF_DIR / "hydra" / "launcher").glob("*.yaml"))
LAUNCHER_TARGETS = {
    "local": "hydra._internal.core_plugins.basic_launcher.BasicLauncher",
    "parallel": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
    "slurm": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
}


def test_every_launcher_option_is_checked():
    assert set(LAUNCHERS) == set(LAUNCHER_TARGETS)


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_a_sweep_grid_runs_unchanged_under_every_launcher(launcher):
    from hydra.utils import get_class

    plain = compose_train(["sweep=gates"], hydra_node=True)
    cfg = compose_train(["sweep=gates", f"hydra/launcher={launcher}"], hydra_node=True)

    assert cfg.hydra.launcher._target_ == LAUNCHER_TARGETS[launcher]
    get_class(cfg.hydra.launcher._target_)  # the plugin is installed
    assert cfg.hydra.mode == RunMode.MULTIRUN
    assert cfg.hydra.sweeper.params == plain.hydra.sweeper.params
    # The launcher changes where the jobs run, not what they train.
    assert compose_train(["sweep=gates", f"hydra/launcher={launcher}"]) == compose_train(["sweep=gates"])


def test_slurm_resources_come_from_the_environment_or_the_command_line(monkeypatch):
    for name in (
        "SBATCH_PARTITION",
        "SBATCH_ACCOUNT",
        "EOPD_NODES",
        "EOPD_GPUS_PER_NODE",
        "EOPD_TIMEOUT_MIN",
    ):
        monkeypatch.delenv(name, raising=False)

    def launcher(*overrides):
        cfg = compose_train(
            ["sweep=gates", "hydra/launcher=slurm", "trainer=ddp", *overrides], hydra_node=True
        )
        keys = ("partition", "account", "nodes", "gpus_per_node", "tasks_per_node", "timeout_min")
        return {k: OmegaConf.select(cfg, f"hydra.launcher.{k}") for k in keys}, cfg.trainer

    defaults, trainer = launcher()
    assert defaults == {
        "partition": None,
        "account": None,
        "nodes": 1,
        "gpus_per_node": 1,
        "tasks_per_node": 1,
        "timeout_min": 240,
    }
    assert (trainer.strategy, trainer.num_nodes) == ("ddp", 1)

    monkeypatch.setenv("SBATCH_PARTITION", "gpu")
    monkeypatch.setenv("SBATCH_ACCOUNT", "proj42")
    monkeypatch.setenv("EOPD_NODES", "2")
    monkeypatch.setenv("EOPD_GPUS_PER_NODE", "4")
    monkeypatch.setenv("EOPD_TIMEOUT_MIN", "600")
    from_env, trainer = launcher()
    assert from_env == {
        "partition": "gpu",
        "account": "proj42",
        "nodes": 2,
        "gpus_per_node": 4,
        "tasks_per_node": 4,  # one process per GPU, as Lightning's DDP expects under SLURM
        "timeout_min": 600,
    }
    assert (trainer.devices, trainer.num_nodes) == (4, 2)  # the trainer matches the job

    from_cli, _ = launcher("hydra.launcher.partition=debug", "hydra.launcher.timeout_min=30")
    assert (from_cli["partition"], from_cli["timeout_min"]) == ("debug", 30)


# ---- config errors -------------------------------------------------------------------------------------


def test_trainer_fsdp_shards_the_student_over_every_process(monkeypatch):
    from lightning.pytorch.strategies import ModelParallelStrategy

    monkeypatch.setenv("EOPD_NODES", "2")
    monkeypatch.setenv("EOPD_GPUS_PER_NODE", "4")
    arguments = eopd.trainer_options.trainer_arguments(compose_train(["trainer=fsdp"]).trainer)

    strategy = arguments["strategy"]
    assert isinstance(strategy, ModelParallelStrategy)
    # One data-parallel dimension over all 8 processes: DistillModule.configure_model shards over it.
    assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (8, 1)
    assert (arguments["devices"], arguments["num_nodes"]) == (4, 2)
    assert eopd.trainer_options.trainer_arguments(compose_train(["trainer=ddp"]).trainer)["strategy"] == "ddp"


def test_off_policy_kd_selects_the_teacher_rollout_unless_the_command_line_says_otherwise():
    kd = compose_train(["objective=kd"])
    assert (kd.objective.name, kd.rollout.source) == ("kd", "teacher")
    assert compose_train(["objective=fkl"]).rollout.source == "student"
    assert compose_train(["objective=kd", "rollout=mix"]).rollout.source == "mix"


def test_unknown_objective_lists_the_available_options():
    with pytest.raises(ConfigCompositionException) as info:
        compose_train(["objective=eopdd"])

    message = str(info.value)
    assert "objective" in message
    assert "Available options" in message
    assert "eopd" in message.split("Available options", 1)[1]


def test_unwritable_output_root_is_reported_before_any_model_loads(tmp_path, no_model_loads):
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        if os.access(read_only, os.W_OK):
            pytest.skip("chmod does not stop this user from writing (root)")
        cfg = compose_train([f"output_root={read_only}"])

        with pytest.raises(ConfigError, match="output_root"):
            eopd.train.run(cfg, Path(cfg.output_root) / "runs" / "eopd-s0")
    finally:
        read_only.chmod(0o755)


def test_temperature_mismatch_is_reported_before_any_model_loads(tmp_path, no_model_loads):
    cfg = compose_train(["objective.temperature=0.7", "rollout.temperature=1.0"])

    with pytest.raises(ValueError, match="rollout.temperature") as info:
        eopd.train.run(cfg, tmp_path / "run")

    assert "0.7" in str(info.value)


# ---- the command line ---------------------------------------------------------------------------------


def _train_cli(*overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.run(
        [sys.executable, "-m", "eopd.train", "pair=tiny_random", *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "override",
    [
        "rollout_steps=0",
        "pair.student.path=/no/such/model",
    ],
)
def test_cli_config_error_exits_2_with_a_message_not_a_traceback(override, tmp_path):
    result = _train_cli(override, f"output_root={tmp_path}")

    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert override.split("=")[0] in output
    assert "Traceback" not in output
