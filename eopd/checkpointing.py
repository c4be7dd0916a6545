"""Resuming runs: atomic checkpoints, RNG state, the run directory's lifecycle, and preemption signals.

A run directory goes through three states. It is claimed (`claim_run_dir`: a lock held while the run
writes, so two jobs never write into one directory), it holds checkpoints (Lightning's ModelCheckpoint,
written through `AtomicCheckpointIO`: a crash never leaves a half-written file under a checkpoint's
name), and it is finished (`mark_finished`: `finished.json`; a new run never writes over it).

    python -m eopd.train resume=auto          # continue the newest unfinished run of this run_name

Exact resume: the student, optimizer, LR scheduler and loop counters are Lightning's own checkpoint
content; the module adds its rollout step (its sampling streams are functions of it), the data loader
adds its position (`eopd.data.prompt_loader`), and `ResumeState` adds every global RNG state.
"""

from __future__ import annotations

import csv
import fcntl
import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("eopd.checkpointing")

FINISHED = "finished.json"
LOCK = "run.lock"
RUN_OUTPUTS = ("metrics.csv", "samples.jsonl", "student")  # a directory with one of these holds a run
PREEMPTION_SIGNALS = ("SIGTERM", "SIGUSR1")


class Preempted(Exception):
    """The run saved a checkpoint on a preemption signal and stopped; `resume=auto` continues it."""


class NonFiniteTraining(RuntimeError):
    """Too many updates in a row were not finite; the message names the step and the diagnostics."""


# ---- atomic files ---------------------------------------------------------------------------------------


def write_json_atomic(path: Path, content: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(content, indent=2))
    os.replace(tmp, path)


# ---- RNG state --------------------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """Every global RNG state: python, numpy, torch (CPU) and each CUDA device.

    Only tensors and plain Python values, so that checkpoints load with `torch.load(weights_only=True)`.
    """
    name, keys, position, has_gauss, gauss = np.random.get_state()
    numpy_state = [name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(gauss)]
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    name, keys, position, has_gauss, gauss = state["numpy"]
    random.setstate(state["python"])
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- the run directory ------------------------------------------------------------------------------------


def checkpoints_newest_first(run_dir: Path | str) -> list[Path]:
    """The complete checkpoints of a run, newest first: ModelCheckpoint's files and Lightning's SLURM ones."""
    run_dir = Path(run_dir)
    found = [*(run_dir / "checkpoints").glob("*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")]
    found = [p for p in found if not p.name.startswith(".") and p.is_file()]  # not a save in progress
    return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name == "last.ckpt"), reverse=True)


def latest_checkpoint(run_dir: Path | str) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = checkpoints_newest_first(run_dir)
    return found[0] if found else None


def unreadable_reason(path: Path | str) -> str | None:
    """Why `path` is not a complete PyTorch checkpoint (a zip archive with its pickle), or None if it is.

    Reads the archive's directory only, not the tensors: cheap even for a checkpoint of many GB.
    """
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        return f"not a complete PyTorch checkpoint ({error})"
    if not any(name.endswith("data.pkl") for name in names):
        return "not a PyTorch checkpoint (no data.pkl in the archive)"
    return None


def is_finished(run_dir: Path | str) -> bool:
    return (Path(run_dir) / FINISHED).is_file()


def mark_finished(run_dir: Path | str, metrics: dict[str, float]) -> None:
    """Record that the run completed, with its final metrics; a finished run is never written over."""
    write_json_atomic(Path(run_dir) / FINISHED, {k: float(v) for k, v in metrics.items()})


def finished_metrics(run_dir: Path | str) -> dict[str, float]:
    return json.loads((Path(run_dir) / FINISHED).read_text())


def run_dir_for(base: str, stamp: str, resume: str | None) -> str:
    """`hydra.run.dir`: `base/stamp`, or with resume=auto the newest unfinished run under `base` that has a
    checkpoint (so a rerun or a requeued job lands in the directory it left)."""
    if resume == "auto" and Path(base).is_dir():
        unfinished = [
            d for d in Path(base).iterdir() if d.is_dir() and not is_finished(d) and latest_checkpoint(d)
        ]
        if unfinished:
            return str(max(unfinished, key=lambda d: latest_checkpoint(d).stat().st_mtime_ns))
    return f"{base}/{stamp}"


def resume_checkpoint(resume: str | None, run_dir: Path | str) -> Path | None:
    """The checkpoint a run in `run_dir` starts from (None: from scratch); ValueError when it cannot start.

    Args:
        resume: None (a new run: the directory must not hold one), "auto" (the newest checkpoint in the
            directory, or from scratch when there is none), or the path of a checkpoint file.
    """
    run_dir = Path(run_dir)
    if resume is None:
        started = latest_checkpoint(run_dir) or any((run_dir / name).exists() for name in RUN_OUTPUTS)
        if is_finished(run_dir) or started:
            state = "a finished run" if is_finished(run_dir) else "a run"
            raise ValueError(
                f"output directory {run_dir} already holds {state}; its files are kept. Continue it with "
                "resume=auto, or start a new run in another directory (output_root=... or hydra.run.dir=...)"
            )
        return None
    if resume == "auto":
        if is_finished(run_dir):
            return None
        for candidate in checkpoints_newest_first(run_dir):
            reason = unreadable_reason(candidate)
            if reason is None:
                return candidate
            log.warning("resume=auto: skipping the unreadable checkpoint %s: %s", candidate, reason)
        return None
    return resume_file(resume)


def resume_file(resume: str) -> Path:
    """The checkpoint file `resume=<path>` names; ValueError naming it when it is missing or unreadable."""
    path = Path(str(resume)).expanduser()
    if not path.is_file():
        raise ValueError(
            f"config 'resume'={resume!r}: no checkpoint file there; use resume=auto (the newest checkpoint "
            "in the run directory) or the path of a .ckpt file"
        )
    reason = unreadable_reason(path)
    if reason is not None:
        raise ValueError(
            f"config 'resume'={resume!r}: the checkpoint file {path} is unreadable: {reason}. It may be a "
            "partial copy or a damaged file: give another .ckpt file, or use resume=auto, which takes the "
            "newest readable checkpoint of the run"
        )
    return path


class RunLock:
    """An exclusive lock on a run directory for as long as the run writes into it.

    flock is released by the kernel when the process ends, however it ends, so a killed run never leaves
    its directory locked.
    """

    def __init__(self, run_dir: Path | str) -> None:
        self.path = Path(run_dir) / LOCK
        self._file = open(self.path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise ValueError(
                f"output directory {run_dir} is in use by {holder}; two runs never write into one "
                "directory. Wait for it to end, or start this run in another directory"
            ) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        self._file.flush()

    def release(self) -> None:
        if not self._file.closed:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()


def launched_rank() -> int:
    """This process's rank as its launcher set it (0 when none did): Lightning's subprocess launcher, SLURM,
    torchrun. Known before the Trainer exists, so only rank 0 claims the run directory."""
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    local, node = (int(os.environ.get(key, "0") or 0) for key in ("LOCAL_RANK", "NODE_RANK"))
    return local if node == 0 else node * 1_000_000 + local  # only "is it 0?" matters here


class _Unlocked:
    """The lock a rank other than 0 holds: none (rank 0 holds the directory's)."""

    def release(self) -> None:
        pass


def follow_run_dir(run_dir: Path | str, resume: str | None) -> tuple[_Unlocked, Path | None]:
    """What a rank other than 0 starts from, in the directory rank 0 has claimed and checked.

    Rank 0 starts the other ranks' processes from inside `fit`, before it writes a checkpoint, so every
    rank resolves resume=auto to the same file.
    """
    run_dir = Path(run_dir)
    if resume is None:
        return _Unlocked(), None
    if resume == "auto":
        return _Unlocked(), None if is_finished(run_dir) else latest_checkpoint(run_dir)
    return _Unlocked(), Path(str(resume)).expanduser()


def claim_run_dir(run_dir: Path | str, resume: str | None) -> tuple[RunLock, Path | None]:
    """Create and lock `run_dir`, then decide (under the lock) what the run starts from."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir)
    try:
        return lock, resume_checkpoint(resume, run_dir)
    except ValueError:
        lock.release()
        raise


def config_changes(saved: Path | str, config: dict[str, Any]) -> list[str]:
    """Keys (dotted) whose values differ between a run's saved config.yaml and `config`, `resume` aside."""
    from omegaconf import OmegaConf

    def flat(node: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(node, dict):
            return {prefix.rstrip("."): node}
        return {k: v for key, value in node.items() for k, v in flat(value, f"{prefix}{key}.").items()}

    before = flat(OmegaConf.to_container(OmegaConf.load(saved)))
    after = flat(config)
    return sorted(k for k in before.keys() | after.keys() if k != "resume" and before.get(k) != after.get(k))


def checkpoint_steps(path: Path | str) -> tuple[int, int]:
    """(optimizer step, rollout step) of a checkpoint, read without loading its tensors into memory."""
    checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    return int(checkpoint["global_step"]), int(checkpoint.get("eopd", {}).get("rollout_step", 0))


def keep_logs_until(run_dir: Path | str, loggers: list, step: int, rollout_step: int) -> None:
    """On resume, keep what the run logged up to the checkpoint and drop what it logged after it.

    Lightning's CSVLogger starts its file afresh in a directory that has one, so the kept rows are handed
    to its writer, which writes them back before the resumed run's rows. samples.jsonl is cut the same way.
    """
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.csv"
    rows = []
    if metrics.is_file():
        with open(metrics, newline="") as f:
            rows = [row for row in csv.DictReader(f) if row.get("step") and int(row["step"]) <= step]
    for logger in loggers:
        if type(logger).__name__ == "CSVLogger":
            writer = logger.experiment  # creating the writer removes the old file
            for row in rows:
                writer.metrics.append({k: _number(k, v) for k, v in row.items() if v != ""})
            writer.save()  # back on disk now, not at the first save of the resumed run: a crash keeps them
    samples = run_dir / "samples.jsonl"
    if samples.is_file():
        lines = [
            ln for ln in samples.read_text().splitlines() if json.loads(ln).get("step", 0) <= rollout_step
        ]
        tmp = samples.with_name(f".{samples.name}.tmp")
        tmp.write_text("".join(f"{ln}\n" for ln in lines))
        os.replace(tmp, samples)


def _number(key: str, value: str) -> float | int:
    return int(value) if key == "step" else float(value)


__all__ = [
    "NonFiniteTraining",
    "Preempted",
    "RunLock",
    "capture_rng",
    "claim_run_dir",
    "latest_checkpoint",
    "mark_finished",
    "restore_rng",
    "resume_checkpoint",
    "run_dir_for",
]
