"""The Lightning side of a run: the callbacks and the checkpoint plugin `eopd.train` hands to the Trainer.

    AtomicCheckpointIO   a checkpoint appears under its name only once fully on disk
    ResumeState          every global RNG state in each checkpoint, restored on resume
    PeriodicEvaluation   `eopd.evaluation.evaluate` every N rollout steps and at the end, logged under val/
    Preemption           SIGTERM / SIGUSR1: finish the step, save, stop (and requeue under SLURM)
    Curriculum           the prompt curriculum's difficulty probe and competence gate (`eopd.curriculum`)

Kept apart from `eopd.checkpointing` and `eopd.evaluation` so that the config checks, which use those,
run without importing Lightning: a bad command line is answered in about a second.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.plugins.io import TorchCheckpointIO

from eopd.checkpointing import PREEMPTION_SIGNALS, capture_rng, restore_rng
from eopd.curriculum import CurriculumBatches

log = logging.getLogger("eopd.callbacks")
validation_log = logging.getLogger("eopd.evaluation")  # where the validation lines have always been logged
curriculum_log = logging.getLogger("eopd.curriculum")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, but a checkpoint appears under its name only once fully on disk.

    The file is written next to its destination, flushed to disk, then renamed over it (`os.replace` is
    atomic on POSIX): a crash mid-save leaves the previous checkpoint intact and a stray `*.tmp` file.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


class ResumeState(L.Callback):
    """Puts the global RNG states into every checkpoint and restores them on resume.

    It also flushes the loggers with each checkpoint, so that after a crash the metrics on disk reach at
    least up to the checkpoint a resumed run continues from.
    """

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng"] = capture_rng()
        for logger in trainer.loggers:
            logger.save()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if "rng" in checkpoint:
            restore_rng(checkpoint["rng"])


class PeriodicEvaluation(L.Callback):
    """Runs `evaluate` on a fixed validation subset every N rollout steps and at the end of training.

    Logs every metric under `val/` at the current optimizer step, through the trainer's loggers.
    """

    def __init__(self, run_evaluation, *, every_n_rollout_steps: int = 0, at_end: bool = True) -> None:
        super().__init__()
        self.run_evaluation = run_evaluation  # (student model) -> dict of metrics
        self.every = every_n_rollout_steps
        self.at_end = at_end
        self.history: list[tuple[int, dict[str, float]]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = getattr(pl_module, "rollout_step", 0)
        due = self.every > 0 and step % self.every == 0
        if due and not trainer.should_stop and not self._is_last(trainer):
            self._evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        stopped_early = trainer.max_steps > 0 and trainer.global_step < trainer.max_steps
        if self.at_end and not stopped_early:  # a preempted run evaluates when it completes, not when stopped
            self._evaluate(trainer, pl_module)

    def _is_last(self, trainer) -> bool:
        return self.at_end and trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps

    def _evaluate(self, trainer, pl_module) -> None:
        if self.history and self.history[-1][0] == trainer.global_step:
            return
        # Under FSDP every rank evaluates with the gathered student (the same prompts and seeds).
        metrics = pl_module.on_student(self.run_evaluation, gathered=True)
        self.history.append((trainer.global_step, metrics))
        logged = {f"val/{k}": v for k, v in metrics.items()}
        logged["step/rollout"] = float(getattr(pl_module, "rollout_step", 0))
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=trainer.global_step)
        validation_log.info(
            "step %d validation: %s",
            trainer.global_step,
            ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.startswith(("avg@", "pass@"))),
        )


class Preemption(L.Callback):
    """SIGTERM or SIGUSR1: finish the current training step, then stop with a checkpoint.

    The handler only records the signal; the run stops between steps, where ModelCheckpoint's save at the
    end of training (save_last) writes `checkpoints/last.ckpt`, so the checkpoint is exact. Under SLURM
    (Lightning's SLURMEnvironment with auto_requeue, its default there) Lightning's own requeue handler is
    called at that point too: it saves `hpc_ckpt_N.ckpt` and requeues the job. Without a ModelCheckpoint,
    this callback writes `checkpoints/last.ckpt` itself. `signal_received` names the signal once one came.
    """

    def __init__(self) -> None:
        self.signal_received: str | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        # Runs after Lightning's signal connector is set up at fit start, so this handler is the one called;
        # Lightning's teardown puts back the handlers from before fit.
        for name in PREEMPTION_SIGNALS:
            try:
                signal.signal(getattr(signal, name), self._record)
            except ValueError:  # not the main thread: leave the signals to whoever owns them
                return

    def _record(self, number: int, frame) -> None:
        self.signal_received = signal.Signals(number).name
        log.warning("%s received: stopping with a checkpoint after the current step", self.signal_received)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.signal_received is None or trainer.should_stop:
            return
        trainer.should_stop = True
        environment = trainer._accelerator_connector.cluster_environment
        requeue = getattr(trainer._signal_connector, "_slurm_sigusr_handler_fn", None)
        if isinstance(environment, SLURMEnvironment) and environment.auto_requeue and requeue is not None:
            requeue(getattr(signal, self.signal_received), None)  # saves hpc_ckpt_N.ckpt, requeues the job
        if not trainer.checkpoint_callbacks:
            trainer.save_checkpoint(Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt")


class Curriculum(L.Callback):
    """Measures the difficulties before the first update and advances the curriculum after every step.

    Args:
        sampler: the prompt loader's `CurriculumBatches`.
        measure: for difficulty="pass_rate", `measure(model, indices) -> correct samples per prompt`, out of
            `spec.probe_samples`, for the training prompts at `indices` (a sampling evaluation).
        field_values: for difficulty="field", the difficulty of every training prompt.
    """

    def __init__(
        self,
        sampler: CurriculumBatches,
        *,
        measure: Callable[[Any, list[int]], Sequence[int]] | None = None,
        field_values: Sequence[float] | None = None,
    ) -> None:
        self.sampler = sampler
        self.measure = measure
        self.field_values = field_values

    def on_train_start(self, trainer, pl_module) -> None:
        if self.sampler.difficulty is not None:  # restored from the checkpoint a resumed run continues
            return
        spec = self.sampler.spec
        started = time.perf_counter()
        if spec.difficulty == "field":
            difficulty = list(self.field_values)
        else:
            rank, world = trainer.global_rank, trainer.world_size
            mine = list(range(rank, self.sampler.n, world))
            correct = pl_module.on_student(lambda model: list(self.measure(model, mine)), gathered=True)
            counts: list[int | None] = [None] * self.sampler.n
            for indices, values in _gather((mine, correct), world):
                for index, value in zip(indices, values, strict=True):
                    counts[index] = int(value)
            if None in counts:  # every prompt is one rank's share: a gap is a bug, not a pass rate of 0
                raise RuntimeError(f"the curriculum probe missed {counts.count(None)} prompts")
            difficulty = [1.0 - c / spec.probe_samples for c in counts]
        self.sampler.set_difficulty(difficulty)
        seconds = time.perf_counter() - started
        sizes = [len(self.sampler.pool(s)) for s in range(spec.stages)]
        summary = {"time/curriculum_probe": seconds, "curriculum/difficulty_mean": _mean(difficulty)}
        for logger in trainer.loggers:
            logger.log_metrics(summary, step=trainer.global_step)
        curriculum_log.info(
            "curriculum: %s difficulty of %d prompts (mean %.3f) in %.1f s; stage pools %s",
            spec.difficulty,
            len(difficulty),
            summary["curriculum/difficulty_mean"],
            seconds,
            sizes,
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        sampler, spec = self.sampler, self.sampler.spec
        trained = sampler.stage_of(sampler.served - 1)  # the batch this step trained on
        logs = getattr(pl_module, "last_logs", {})
        if spec.metric not in logs:
            raise ValueError(
                f"curriculum.metric={spec.metric!r} is not among the step's logs; pick one of: "
                + ", ".join(sorted(logs))
            )
        value = logs[spec.metric]
        recent = [*sampler.competence, value][-spec.window :]
        advanced = sampler.observe(value)
        metrics = {
            "curriculum/stage": float(trained + 1),  # 1 = the easiest bucket alone
            "curriculum/pool_size": float(len(sampler.pool(trained))),
            "curriculum/competence": _mean(recent),
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if advanced:
            curriculum_log.info(
                "curriculum: stage %d of %d from rollout step %d (%s over the last steps %.3f): pool of %d prompts",
                sampler.stage + 1,
                spec.stages,
                getattr(pl_module, "rollout_step", 0) + 1,
                spec.metric,
                _mean(recent),
                len(sampler.pool()),
            )


def _gather(item: Any, world: int) -> list[Any]:
    """`item` of every rank (torch.distributed's object gather), or [item] in a single process."""
    if world == 1:
        return [item]
    import torch.distributed as dist

    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, item)
    return gathered


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


__all__ = ["AtomicCheckpointIO", "Curriculum", "PeriodicEvaluation", "Preemption", "ResumeState"]
