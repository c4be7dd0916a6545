"""Resume, preemption and faults: a stopped and resumed run logs what an uninterrupted one logs, step by step."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import conftest
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import eopd.module
import eopd.train
from eopd import checkpointing
from eopd.callbacks import AtomicCheckpointIO
from eopd.checkpointing import (
    Preempted,
    RunLock,
    capture_rng,
    latest_checkpoint,
    restore_rng,
    run_dir_for,
)
from eopd.data import PromptDataset, PromptFormat, ResumableBatches, prompt_loader
from eopd.module import DistillModule, NonFiniteTraining
from eopd.objectives import Objective
from eopd.tasks.tokenizer import build_tokenizer
from eopd.train import ConfigError

CONF_DIR = Path(eopd.train.CONF_DIR)
REPO = CONF_DIR.parent
# 12 prompts in batches of 4: an epoch is 3 rollout steps, so 5 steps cross an epoch boundary.
TINY = conftest.TINY_RUN
UNTIMED = ("time/", "perf/")  # wall-clock columns: the only ones allowed to differ
compose_train = partial(conftest.compose_train, base=TINY)


def read_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def assert_same_metrics(expected: list[dict[str, str]], actual: list[dict[str, str]], after_step: int = -1):
    """Row for row, every logged value at optimizer steps > after_step agrees to 1e-6."""
    expected = [r for r in expected if int(r["step"]) > after_step]
    actual = [r for r in actual if int(r["step"]) > after_step]
    assert [r["step"] for r in actual] == [r["step"] for r in expected]
    for want, got in zip(expected, actual, strict=True):
        for key in want:
            if key.startswith(UNTIMED):
                continue
            assert (want[key] == "") == (got.get(key, "") == ""), f"{key} at step {want['step']}"
            if want[key]:
                assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-6, abs=1e-6), (
                    f"{key} at step {want['step']}: {got[key]} != {want[key]}"
                )


def student_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(run_dir / "student").state_dict()


def signal_after_rollout_step(monkeypatch, step: int, number=signal.SIGUSR1):
    """Deliver `number` to this process right after the given rollout step, as a scheduler would."""
    original = DistillModule.training_step

    def training_step(self, batch, batch_idx):
        out = original(self, batch, batch_idx)
        if self.rollout_step == step:
            os.kill(os.getpid(), number)
        return out

    monkeypatch.setattr(DistillModule, "training_step", training_step)


# ---- exact resume, in process ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    eopd.train.run(compose_train(["rollout_steps=5", "eval.every_n_rollout_steps=2"]), run_dir)
    return run_dir


def test_run_stopped_mid_epoch_and_resumed_logs_what_an_uninterrupted_run_logs(
    uninterrupted, tmp_path, monkeypatch
):
    cfg = compose_train(["rollout_steps=5", "eval.every_n_rollout_steps=2"])
    run_dir = tmp_path / "run"
    signal_after_rollout_step(monkeypatch, 4)  # step 4 is the first of the second epoch

    with pytest.raises(Preempted, match="SIGUSR1.*rollout step 4.*resume=auto"):
        eopd.train.run(cfg, run_dir)
    stopped_at, rollout_step = checkpointing.checkpoint_steps(latest_checkpoint(run_dir))
    assert rollout_step == 4
    assert not (run_dir / "student").exists() and not checkpointing.is_finished(run_dir)

    monkeypatch.undo()
    eopd.train.run(compose_train(["rollout_steps=5", "eval.every_n_rollout_steps=2", "resume=auto"]), run_dir)

    assert_same_metrics(read_rows(uninterrupted), read_rows(run_dir))
    assert max(int(r["step"]) for r in read_rows(run_dir)) > stopped_at
    assert [r["step"] for r in read_rows(run_dir) if r.get("val/avg@2")] == ["4", "8", "10"]
    expected, actual = student_weights(uninterrupted), student_weights(run_dir)
    for name, weight in expected.items():
        torch.testing.assert_close(actual[name], weight, rtol=1e-6, atol=1e-6)
    samples = [json.loads(line)["step"] for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert samples == sorted(samples), "samples.jsonl repeats steps after the resume"


def test_a_run_with_a_curriculum_resumed_after_a_stage_change_logs_what_an_uninterrupted_one_logs(
    tmp_path, monkeypatch
):
    # 3 stages of 4, 8 and 12 prompts; a stage ends after 2 rollout steps (the random student never passes
    # the competence gate): stopped after step 3, the run resumes in the second stage with its gate's state.
    overrides = [
        "rollout_steps=5",
        "eval.every_n_rollout_steps=0",
        "curriculum=sead",
        "curriculum.stages=3",
        "curriculum.probe_samples=2",
        "curriculum.max_stage_steps=2",
        "curriculum.window=1",
        "curriculum.advance_at=0.5",
    ]
    eopd.train.run(compose_train(overrides), tmp_path / "uninterrupted")
    run_dir = tmp_path / "run"
    signal_after_rollout_step(monkeypatch, 3)
    with pytest.raises(Preempted):
        eopd.train.run(compose_train(overrides), run_dir)
    monkeypatch.undo()

    eopd.train.run(compose_train([*overrides, "resume=auto"]), run_dir)

    expected, actual = read_rows(tmp_path / "uninterrupted"), read_rows(run_dir)
    assert_same_metrics(expected, actual)
    assert [r["curriculum/stage"] for r in actual if r.get("curriculum/stage")] == [
        "1.0",
        "1.0",
        "2.0",
        "2.0",
        "3.0",
    ]
    assert sum(1 for r in actual if r.get("time/curriculum_probe")) == 1, "the resumed run probed again"


def test_checkpoint_holds_every_rng_state_and_the_data_position(uninterrupted):
    checkpoint = torch.load(
        uninterrupted / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )

    assert set(checkpoint["rng"]) >= {"python", "numpy", "torch"}
    loader_state = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader_state == [{"batches_served": 5}]
    assert checkpoint["eopd"]["rollout_step"] == 5
    assert checkpoint["optimizer_states"] and checkpoint["lr_schedulers"]


def test_checkpoint_interval_off_the_rollout_grid_is_rounded_up_to_the_next_rollout_step(tmp_path, caplog):
    # 2 optimizer steps per rollout step: every 3 steps would only meet Lightning's check at step 6.
    cfg = compose_train(["rollout_steps=3", "callbacks.checkpoint_every_n_steps=3"])

    eopd.train.run(cfg, tmp_path / "run")

    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("*.ckpt"))
    assert saved == ["epoch=0-step=4.ckpt", "last.ckpt"]
    assert "checkpointing every 4 steps" in caplog.text


def test_resume_writes_the_kept_metrics_back_before_training_starts(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    (tmp_path / "metrics.csv").write_text("step,train/loss\n2,0.5\n4,0.25\n6,0.125\n")
    logger = CSVLogger(save_dir=str(tmp_path), name="", version="")

    checkpointing.keep_logs_until(tmp_path, [logger], step=4, rollout_step=2)

    # On disk already: a run killed before its first new row still has its history up to the checkpoint.
    assert [(r["step"], r["train/loss"]) for r in read_rows(tmp_path)] == [("2", "0.5"), ("4", "0.25")]


def test_rng_states_round_trip_through_a_checkpoint_file(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    path = tmp_path / "rng.pt"
    torch.save(capture_rng(), path)
    expected = (random.random(), np.random.rand(), torch.rand(()).item())

    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    restore_rng(torch.load(path, weights_only=True))

    assert (random.random(), np.random.rand(), torch.rand(()).item()) == expected


def test_loader_resumed_from_its_state_serves_the_batches_an_uninterrupted_loader_serves():
    tokenizer = build_tokenizer()
    records = [{"prompt": f"{i}+{i}="} for i in range(10)]
    dataset = PromptDataset(records, student_tokenizer=tokenizer, student_format=PromptFormat())

    def prompts(loader, batches):  # as Lightning reads it: epoch after epoch, stopping after `batches`
        served = []
        while len(served) < batches:
            for batch in loader:
                served.append([row["prompt"] for row in batch])
                if len(served) == batches:
                    break
        return served

    full = prompts(prompt_loader(dataset, batch_size=3, seed=7), 9)  # 3 batches an epoch: 3 epochs
    first = prompt_loader(dataset, batch_size=3, seed=7)
    head = prompts(first, 4)
    resumed = prompt_loader(dataset, batch_size=3, seed=7)
    resumed.load_state_dict(first.state_dict())

    assert head + prompts(resumed, 5) == full
    assert full[:3] != full[3:6], "epochs are not reshuffled"


def test_ranks_share_each_epochs_permutation_and_draw_disjoint_batches(monkeypatch):
    import eopd.data

    def batches(rank: int, world: int, n_batches: int) -> list[list[int]]:
        monkeypatch.setattr(eopd.data, "rank_and_world", lambda: (rank, world))
        sampler = ResumableBatches(20, batch_size=3, seed=5)
        drawn = []
        while len(drawn) < n_batches:  # epoch after epoch, as Lightning reads it
            for batch in sampler:
                drawn.append(batch)
                if len(drawn) == n_batches:
                    break
        return drawn

    one = batches(0, 1, 6)  # 6 batches an epoch
    rank0, rank1 = batches(0, 2, 6), batches(1, 2, 6)  # 20 // (2 x 3) = 3 batches an epoch each

    # Each step the two ranks hold, between them, what one process takes in two steps: the same epochs.
    assert [a + b for a, b in zip(rank0[:3], rank1[:3], strict=True)] == [
        one[0] + one[1],
        one[2] + one[3],
        one[4] + one[5],
    ]
    assert not set(sum(rank0[:3], [])) & set(sum(rank1[:3], [])), "ranks drew the same prompts"
    assert rank0[3:] != rank0[:3], "epochs are not reshuffled"


# ---- preemption of a real training process -----------------------------------------------------------------


def signal_after_first_rollout_step(process: subprocess.Popen, run_dir: Path, number) -> str:
    """Send `number` to a training process once its first rollout step is logged; return its output."""
    try:
        deadline = time.monotonic() + 180
        while not (run_dir / "samples.jsonl").exists():  # written at the end of the first rollout step
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < deadline, "no training step within 180 s"
            time.sleep(0.2)
        process.send_signal(number)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    return output


def test_sigterm_to_a_training_process_saves_exits_cleanly_and_resumes_exactly(tmp_path, caplog):
    run_dir = tmp_path / "run"
    common = ["optimizer.schedule=constant", "eval.every_n_rollout_steps=0", "log.samples_every=1"]
    process = subprocess.Popen(
        [sys.executable, "-m", "eopd.train", *TINY, *common, "rollout_steps=500", f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = signal_after_first_rollout_step(process, run_dir, signal.SIGTERM)

    assert process.returncode == 0, output
    assert "Traceback" not in output
    assert "resume=auto" in output
    _, stopped = checkpointing.checkpoint_steps(run_dir / "checkpoints" / "last.ckpt")
    assert 1 <= stopped < 500

    # Continue for two more rollout steps, and compare with a run that was never stopped.
    steps = [*common, f"rollout_steps={stopped + 2}"]
    with caplog.at_level("WARNING", logger="eopd.train"):
        eopd.train.run(compose_train([*steps, "resume=auto"]), run_dir)
    # Every key that follows the run's length says so, the schedules of the later papers' presets too.
    changed = "objective.anneal_steps, objective.switch_step, rollout_steps, total_optimizer_steps"
    assert f"differs from the run's in: {changed}" in caplog.text
    eopd.train.run(compose_train(steps), tmp_path / "uninterrupted")

    assert_same_metrics(read_rows(tmp_path / "uninterrupted"), read_rows(run_dir))


def test_training_process_killed_outright_resumes_exactly_from_its_last_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    common = [
        "optimizer.schedule=constant",
        "eval.every_n_rollout_steps=1",
        "callbacks.checkpoint_every_n_steps=4",
    ]
    process = subprocess.Popen(
        [sys.executable, "-m", "eopd.train", *TINY, *common, "rollout_steps=500", f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180
        while not list((run_dir / "checkpoints").glob("*step=8.ckpt")):  # the second checkpoint
            assert process.poll() is None and time.monotonic() < deadline, "no second checkpoint"
            time.sleep(0.1)
        process.kill()  # SIGKILL: no handler runs, the logs end wherever they were
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()

    _, resumed_at = checkpointing.checkpoint_steps(latest_checkpoint(run_dir))
    steps = [*common, f"rollout_steps={resumed_at + 2}"]
    eopd.train.run(compose_train([*steps, "resume=auto"]), run_dir)
    eopd.train.run(compose_train(steps), tmp_path / "uninterrupted")

    assert_same_metrics(read_rows(tmp_path / "uninterrupted"), read_rows(run_dir))


def test_under_slurm_a_preempted_run_hands_over_to_lightnings_requeue(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"  # records its arguments instead of talking to a SLURM controller
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.log\n')
    scontrol.chmod(0o755)
    run_dir = tmp_path / "run"
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "eopd", "SLURM_NODELIST": "node1"}
    env = {**os.environ, **slurm, "PATH": f"{bin_dir}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "eopd.train", *TINY, "rollout_steps=500", f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = signal_after_first_rollout_step(process, run_dir, signal.SIGUSR1)

    assert process.returncode == 0, output
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert list(run_dir.glob("hpc_ckpt_*.ckpt")), "Lightning's SLURM checkpoint was not written"
    _, stopped = checkpointing.checkpoint_steps(latest_checkpoint(run_dir))
    _, in_hpc = checkpointing.checkpoint_steps(next(run_dir.glob("hpc_ckpt_*.ckpt")))
    assert stopped == in_hpc >= 1


# ---- the run directory -------------------------------------------------------------------------------------


def test_finished_run_is_never_written_over(uninterrupted, no_model_loads):
    before = {p: p.read_bytes() for p in uninterrupted.rglob("*") if p.is_file() and p.name != "run.lock"}
    cfg = compose_train(["rollout_steps=5", "eval.every_n_rollout_steps=2"])

    with pytest.raises(ConfigError, match=r"already holds a finished run.*resume=auto"):
        eopd.train.run(cfg, uninterrupted)
    assert eopd.train.run(compose_train(["resume=auto"]), uninterrupted) == checkpointing.finished_metrics(
        uninterrupted
    )

    after = {p: p.read_bytes() for p in uninterrupted.rglob("*") if p.is_file() and p.name != "run.lock"}
    assert after == before


def test_a_second_job_never_writes_into_a_directory_in_use(tmp_path, no_model_loads):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = RunLock(run_dir)  # another job holds the directory
    try:
        with pytest.raises(ConfigError, match=f"{run_dir} is in use by pid {os.getpid()}"):
            eopd.train.run(compose_train([]), run_dir)
    finally:
        lock.release()
    assert sorted(p.name for p in run_dir.iterdir()) == ["run.lock"]


@pytest.mark.slow
def test_concurrent_jobs_of_a_sweep_write_only_into_their_own_directories(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "eopd.train",
            "sweep=divergences",
            "objective=opd,eopd,fkl,jsd",
            "seed=0",
            "hydra/launcher=parallel",
            "rollout_steps=2",
            *TINY,
            f"output_root={tmp_path}",
        ],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    (sweep_dir,) = (tmp_path / "sweeps" / "divergences").iterdir()
    jobs = sorted(d for d in sweep_dir.iterdir() if d.is_dir())
    assert len(jobs) == 4
    for job in jobs:
        objective = job.name.split("_", 1)[1].split("-")[0]
        assert OmegaConf.load(job / "config.yaml").objective.name == objective
        steps = [r for r in read_rows(job) if r.get("train/loss")]
        assert len(steps) == 2  # its own two rollout steps, no other job's
        assert checkpointing.finished_metrics(job)["train/loss"] == pytest.approx(
            float(steps[-1]["train/loss"])
        )
        RunLock(job).release()  # released when the job ended


def test_resume_auto_picks_the_newest_unfinished_run_with_a_checkpoint(tmp_path):
    base = tmp_path / "runs" / "eopd-s0"
    for name in ("2026-01-01_00-00-00", "2026-01-02_00-00-00", "2026-01-03_00-00-00", "2026-01-04_00-00-00"):
        (base / name / "checkpoints").mkdir(parents=True)
    (base / "2026-01-01_00-00-00" / "checkpoints" / "last.ckpt").write_bytes(b"older")
    (base / "2026-01-02_00-00-00" / "checkpoints" / "last.ckpt").write_bytes(b"newer")
    os.utime(base / "2026-01-01_00-00-00" / "checkpoints" / "last.ckpt", (1, 1))
    (base / "2026-01-03_00-00-00" / "checkpoints" / "last.ckpt").write_bytes(b"finished run")
    checkpointing.mark_finished(base / "2026-01-03_00-00-00", {})
    (base / "2026-01-04_00-00-00" / "checkpoints" / ".last.ckpt.123.tmp").write_bytes(b"half written")

    assert run_dir_for(str(base), "now", "auto") == str(base / "2026-01-02_00-00-00")
    assert run_dir_for(str(base), "now", None) == f"{base}/now"
    assert run_dir_for(str(tmp_path / "nothing"), "now", "auto") == f"{tmp_path}/nothing/now"
    assert latest_checkpoint(base / "2026-01-04_00-00-00") is None


def test_resume_auto_on_the_command_line_continues_in_the_run_directory(tmp_path):
    def hydra_run_dir() -> Path:
        cfg = compose_train(["resume=auto", f"output_root={tmp_path}"], hydra_node=True)
        return Path(cfg.hydra.run.dir)

    base = tmp_path / "runs" / compose_train([]).run_name
    assert hydra_run_dir().parent == base  # nothing to resume yet: a new run directory
    (base / "earlier" / "checkpoints").mkdir(parents=True)
    (base / "earlier" / "checkpoints" / "last.ckpt").write_bytes(b"x")

    assert hydra_run_dir() == base / "earlier"


def test_atomic_save_leaves_the_previous_checkpoint_when_a_save_fails(tmp_path):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, path)

    with pytest.raises(Exception):  # noqa: B017 - whatever torch.save raises for an unpicklable object
        io.save_checkpoint({"step": 2, "broken": lambda: None}, path)

    assert torch.load(path, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


# ---- faults during a run -----------------------------------------------------------------------------------


def poison_updates(monkeypatch, bad_rollout_steps: set[int], *, where: str):
    """Make the updates of the given rollout steps non-finite; sampling and diagnostics stay finite.

    where="loss": the loss (and so every gradient) is NaN; where="hidden": the student's hidden states are.
    """
    updating = {"step": 0}
    original_update = DistillModule.update
    original_hidden = eopd.module.response_hidden_states
    original_objective = Objective.__call__

    def update(self, *args, **kwargs):
        updating["step"] = self.rollout_step + 1
        return original_update(self, *args, **kwargs)

    def poisoned() -> bool:
        return torch.is_grad_enabled() and updating["step"] in bad_rollout_steps

    def hidden_states(*args, **kwargs):
        hidden = original_hidden(*args, **kwargs)
        return hidden * float("nan") if poisoned() else hidden

    def objective(self, *args, **kwargs):
        out = original_objective(self, *args, **kwargs)
        return out._replace(loss=out.loss * float("nan")) if poisoned() else out

    monkeypatch.setattr(DistillModule, "update", update)
    if where == "hidden":
        monkeypatch.setattr(eopd.module, "response_hidden_states", hidden_states)
    else:
        monkeypatch.setattr(Objective, "__call__", objective)


def test_nonfinite_update_is_skipped_counted_and_logged(tmp_path, monkeypatch):
    poison_updates(monkeypatch, {2}, where="loss")
    run_dir = tmp_path / "run"

    metrics = eopd.train.run(compose_train(["rollout_steps=3", "eval.every_n_rollout_steps=0"]), run_dir)

    rows = {int(float(r["step/rollout"])): r for r in read_rows(run_dir) if r.get("train/loss")}
    assert math.isnan(float(rows[2]["train/grad_norm"]))
    assert [float(rows[s]["fault/skipped_updates"]) for s in (1, 2, 3)] == [0, 2, 2]  # 2 updates a step
    assert math.isfinite(metrics["train/loss"])
    weights = student_weights(run_dir)
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_nonfinite_updates_in_a_row_stop_the_run_naming_step_and_diagnostic(tmp_path, monkeypatch):
    poison_updates(monkeypatch, {3, 4, 5}, where="hidden")
    run_dir = tmp_path / "run"
    cfg = compose_train(
        [
            "rollout_steps=5",
            "eval.every_n_rollout_steps=0",
            "callbacks.checkpoint_every_n_steps=2",
            "update.max_nonfinite_in_a_row=3",
        ]
    )

    with pytest.raises(NonFiniteTraining) as info:
        eopd.train.run(cfg, run_dir)

    message = str(info.value)
    assert "3 updates in a row" in message
    assert "optimizer step 6 (rollout step 4)" in message  # updates 5, 6 (step 3) and 7 (step 4) were bad
    assert "student/hidden_states=nan" in message
    assert "update.max_nonfinite_in_a_row=3" in message
    last = latest_checkpoint(run_dir)
    assert str(last) in message
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    assert checkpoint["eopd"]["rollout_step"] == 3  # the last checkpoint before the stop is kept
    assert all(torch.isfinite(w).all() for w in checkpoint["state_dict"].values())


POISONED_MAIN = """
import torch, eopd.module, eopd.train
original = eopd.module.response_hidden_states
def nan_when_training(*args, **kwargs):
    hidden = original(*args, **kwargs)
    return hidden * float("nan") if torch.is_grad_enabled() else hidden
eopd.module.response_hidden_states = nan_when_training
eopd.train.main()
"""


def test_cli_exits_3_without_a_traceback_when_updates_stay_nonfinite(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            POISONED_MAIN,
            *TINY,
            "rollout_steps=3",
            "update.max_nonfinite_in_a_row=2",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"},
        capture_output=True,
        text=True,
        timeout=300,
    )

    output = result.stdout + result.stderr
    assert result.returncode == 3, output
    assert "2 updates in a row were not finite, the last at optimizer step 1 (rollout step 1)" in output
    assert "Traceback" not in output


# ---- unreadable checkpoints ----------------------------------------------------------------------------


def _checkpoint_like(path: Path) -> Path:
    """A file with a PyTorch checkpoint's layout (a zip archive holding data.pkl), as torch.save writes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}}, path)
    return path


def test_resume_auto_skips_an_unreadable_newest_checkpoint_with_a_warning(tmp_path, caplog):
    older = _checkpoint_like(tmp_path / "checkpoints" / "epoch=0-step=2.ckpt")
    newest = tmp_path / "checkpoints" / "last.ckpt"
    newest.write_bytes(older.read_bytes()[:100])  # cut short, as by a full disk or a killed copy
    os.utime(older, ns=(1, 1))  # older by its time stamp, whatever the file system's resolution

    assert checkpointing.latest_checkpoint(tmp_path) == newest
    with caplog.at_level(logging.WARNING, logger="eopd.checkpointing"):
        assert checkpointing.resume_checkpoint("auto", tmp_path) == older
    assert "last.ckpt" in caplog.text and "unreadable" in caplog.text


def test_an_unreadable_checkpoint_file_is_named_with_what_to_do(tmp_path):
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.ckpt") as info:
        checkpointing.resume_checkpoint(str(broken), tmp_path / "run")
    assert "unreadable" in str(info.value) and "resume=auto" in str(info.value)
    assert checkpointing.unreadable_reason(_checkpoint_like(tmp_path / "good.ckpt")) is None
