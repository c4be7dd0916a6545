"""End to end: `eopd.train.run` on the tiny pair writes metrics, samples, the config, a checkpoint and the student."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import compose_train
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

import eopd.train
from eopd.data import load_records
from eopd.models import load_model, load_tokenizer

CONF_DIR = Path(eopd.train.CONF_DIR)
REPO = CONF_DIR.parent
TINY = [
    "pair=tiny_random",
    "logger=csv",
    "data.batch_size=4",
    "update.mini_batch_size=2",
    "rollout.max_new_tokens=8",
    "data.n_train=64",
]
REQUIRED_COLUMNS = [
    "train/loss",
    "div/fkl",
    "entropy/student",
    "gate/fraction",
    "rollout/len_mean",
    "time/rollout",
    "perf/tokens_per_s",
    "train/lr",
]


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as f:
        return [row for row in csv.DictReader(f) if row.get("train/loss")]


# ---- one tiny run, read by several tests -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    cfg = compose_train(["rollout_steps=2", *TINY])
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    metrics = eopd.train.run(cfg, run_dir)
    return cfg, run_dir, metrics


def test_metrics_csv_has_every_key_finite_at_every_rollout_step(tiny_run):
    cfg, run_dir, _ = tiny_run

    rows = read_metrics(run_dir)

    assert len(rows) == cfg.rollout_steps
    for row in rows:
        for column in REQUIRED_COLUMNS:
            assert row.get(column), f"metrics.csv has no {column} at step {row.get('step')}"
            assert math.isfinite(float(row[column])), f"{column}={row[column]} at step {row.get('step')}"


def test_run_returns_the_last_logged_loss(tiny_run):
    _, run_dir, metrics = tiny_run

    assert metrics["train/loss"] == pytest.approx(float(read_metrics(run_dir)[-1]["train/loss"]))


def test_samples_are_training_prompts_with_responses_and_teacher_entropy(tiny_run):
    cfg, run_dir, _ = tiny_run
    train_prompts = {r["prompt"] for r in load_records(OmegaConf.to_container(cfg.data))["train"]}

    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]

    assert rows
    for row in rows:
        assert row["prompt"] in train_prompts
        assert isinstance(row["response"], str)
        entropies = [float(h) for h in re.findall(r":(-?[0-9.]+)(?= |$)", row["teacher_entropy"])]
        assert entropies or not row["response"], "a response without per-token teacher entropy"
        assert all(h >= 0 for h in entropies)


def test_config_yaml_is_the_resolved_config(tiny_run):
    cfg, run_dir, _ = tiny_run

    text = (run_dir / "config.yaml").read_text()

    assert "${" not in text
    assert OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml")) == OmegaConf.to_container(
        cfg, resolve=True
    )


def test_saved_student_loads_with_transformers_and_was_trained(tiny_run):
    cfg, run_dir, _ = tiny_run
    p = eopd.train.plan(cfg, run_dir)
    tokenizer = load_tokenizer(p.student_source, eos_token=cfg.pair.student_eos)
    eos = tokenizer.convert_tokens_to_ids(cfg.pair.student_eos)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    initial = load_model(
        p.student_source,
        vocab_size=len(tokenizer),
        dtype=cfg.pair.dtype,
        special_ids={"eos_token_id": eos, "pad_token_id": pad},
    ).state_dict()

    saved = AutoModelForCausalLM.from_pretrained(run_dir / "student").state_dict()
    saved_tokenizer = AutoTokenizer.from_pretrained(run_dir / "student")

    text = p.records["train"][0]["prompt"]
    assert saved_tokenizer.encode(text) == tokenizer.encode(text)
    assert saved_tokenizer.eos_token == cfg.pair.student_eos
    assert saved.keys() == initial.keys()
    change = max((saved[k] - initial[k]).abs().max().item() for k in initial)
    # Moved, but only by a few optimizer steps' worth: the same initial model, trained.
    assert 0 < change < 10 * p.max_steps * cfg.optimizer.lr


def test_checkpoint_holds_the_student_and_not_the_teacher(tiny_run):
    cfg, run_dir, _ = tiny_run

    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)

    keys = list(checkpoint["state_dict"])
    assert any(k.startswith("student.") for k in keys)
    assert not [k for k in keys if k.startswith("teacher")]
    assert checkpoint["eopd"]["rollout_step"] == cfg.rollout_steps


def test_help_lists_every_group_and_option():
    result = subprocess.run(
        [sys.executable, "-m", "eopd.train", "--help"],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr
    groups_section = result.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    lines = {line.split(":")[0]: line for line in groups_section.splitlines() if ":" in line}
    for group in sorted(d for d in CONF_DIR.iterdir() if d.is_dir() and d.name != "hydra"):
        assert group.name in lines, f"--help does not list the {group.name} group"
        for option in group.glob("*.yaml"):
            assert option.stem in lines[group.name]


# ---- slow: wandb, every preset, a sweep ------------------------------------------------------------------


@pytest.mark.slow
def test_wandb_without_an_api_key_writes_an_offline_run_into_the_run_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline must come from eopd's own decision
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc with a wandb key
    cfg = compose_train(["rollout_steps=1", *TINY, "logger=wandb"])
    run_dir = tmp_path / "run"

    eopd.train.run(cfg, run_dir)

    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    assert list(offline_runs[0].glob("*.wandb")), "the offline run has no .wandb data file"


@pytest.mark.slow
@pytest.mark.parametrize("objective", sorted(p.stem for p in (CONF_DIR / "objective").glob("*.yaml")))
def test_every_objective_trains_one_rollout_step(objective, tmp_path):
    cfg = compose_train(["rollout_steps=1", *TINY, f"objective={objective}"])

    metrics = eopd.train.run(cfg, tmp_path / "run")

    assert math.isfinite(metrics["train/loss"])
    if objective in ("rkl", "fkl", "jsd"):  # analytic divergences are never negative
        assert metrics["train/loss"] >= 0


@pytest.mark.slow
def test_sweep_runs_the_grid_narrowed_from_the_command_line(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "eopd.train",
            "sweep=divergences",
            "objective=opd,eopd",
            "seed=0",
            "rollout_steps=1",
            *TINY,
            f"output_root={tmp_path}",
        ],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"},
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    (sweep_dir,) = (tmp_path / "sweeps" / "divergences").iterdir()
    jobs = sorted(d for d in sweep_dir.iterdir() if d.is_dir())
    assert sorted(d.name.split("_", 1)[1] for d in jobs) == ["eopd-s0", "opd-s0"]
    for job in jobs:
        assert read_metrics(job), f"{job.name} logged no training step"


ON_TWO_CPU_PROCESSES = [
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "trainer.precision=32-true",
    "callbacks.checkpoint_every_n_steps=2",  # one checkpoint per rollout step (2 optimizer steps)
]


def train_on_two_cpu_processes(
    strategy: str, output_root: Path, *extra: str, rollout: str = "mix"
) -> subprocess.CompletedProcess:
    """Three rollout steps on two CPU processes; rollout=mix: some steps sample the student, others the teacher."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "eopd.train",
            "rollout_steps=3",
            *TINY,
            f"trainer={strategy.removesuffix('_teacher')}",
            *ON_TWO_CPU_PROCESSES,
            f"rollout={rollout}",
            *(["+pair.teacher.shard=true"] if strategy == "fsdp_teacher" else []),
            f"output_root={output_root}",
            *extra,
        ],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "ddp", "fsdp_teacher"])  # the last shards the teacher too
def test_two_cpu_processes_train_save_the_whole_student_and_resume_exactly(strategy, tmp_path):
    result = train_on_two_cpu_processes(strategy, tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr
    (run_dir,) = (tmp_path / "runs").glob("*/*")
    rows = read_metrics(run_dir)
    assert [float(r["step/rollout"]) for r in rows] == [1.0, 2.0, 3.0]
    assert all(math.isfinite(float(r["train/loss"])) for r in rows)
    assert {float(r["rollout/on_policy"]) for r in rows} == {0.0, 1.0}
    # Saved from the gathered shards: every weight whole, and trained.
    saved = AutoModelForCausalLM.from_pretrained(run_dir / "student").state_dict()
    cfg = compose_train(["rollout_steps=2", *TINY])
    p = eopd.train.plan(cfg, tmp_path / "plan")
    tokenizer = load_tokenizer(p.student_source, eos_token=cfg.pair.student_eos)
    eos = tokenizer.convert_tokens_to_ids(cfg.pair.student_eos)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    special = {"eos_token_id": eos, "pad_token_id": pad}
    initial = load_model(
        p.student_source, vocab_size=len(tokenizer), dtype=cfg.pair.dtype, special_ids=special
    ).state_dict()
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in initial.items()}
    assert any(not torch.equal(saved[k], initial[k]) for k in initial)
    table = json.loads((run_dir / "eval.json").read_text())  # rank 0's final evaluation, teacher included
    assert set(table) == {"student before", "student after", "teacher", "problems"}
    assert set(table["problems"]) == {"student before", "student after", "teacher"}
    assert math.isfinite(table["student after"]["div/fkl_high_entropy"])
    # Checkpoints are whole files, so a sharded run resumes like any other: from rollout step 2's
    # checkpoint, step 3 logs what the uninterrupted run logged.
    (checkpoint,) = (run_dir / "checkpoints").glob("*step=4.ckpt")
    assert checkpoint.is_file()
    resumed = train_on_two_cpu_processes(
        strategy, tmp_path / "resumed", f"resume='{checkpoint}'"
    )  # quoted: '='
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    (resumed_dir,) = (tmp_path / "resumed" / "runs").glob("*/*")
    after = read_metrics(resumed_dir)
    assert [float(r["step/rollout"]) for r in after] == [3.0]
    for column in ("train/loss", "div/fkl", "rollout/on_policy", "rollout/len_mean"):
        assert float(after[0][column]) == pytest.approx(float(rows[2][column]), rel=1e-5, abs=1e-7), column


@pytest.mark.slow
def test_two_ddp_processes_share_the_curriculum_probe_and_its_stages(tmp_path):
    # Each rank probes half of the 64 prompts; the counts are gathered so both ranks rank all of them.
    result = train_on_two_cpu_processes(
        "ddp",
        tmp_path,
        "curriculum=sead",
        "curriculum.probe_samples=2",
        "curriculum.max_stage_steps=1",
        rollout="default",
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "pass_rate difficulty of 64 prompts" in result.stdout + result.stderr
    (run_dir,) = (tmp_path / "runs").glob("*/*")
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["curriculum/stage"]) for r in rows if r.get("curriculum/stage")] == [1.0, 2.0, 3.0]
    assert [float(r["curriculum/pool_size"]) for r in rows if r.get("curriculum/pool_size")] == [16, 32, 48]
