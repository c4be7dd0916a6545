"""DistillModule: one LightningModule holding the student and the frozen teacher, one rollout batch a step.

A training step, as in the paper (PAPER.md section 3), flows one way:

    prompts -> rollout (student samples; or the teacher, or a per-batch mix)
            -> teacher statistics (one teacher forward, reduced tile by tile: no full teacher logits)
            -> old log-probs (one student forward, no grad) and the diagnostics at the rollout policy
            -> ppo_epochs x (rollout batch / mini-batch) optimizer steps on the objective

Usable without Hydra:

    module = DistillModule(student, teacher, preset("eopd"), tokenizer=tok, pair=PairSpec(...))
    lightning.Trainer(max_steps=...).fit(module, train_dataloaders=prompt_loader)

The teacher is deliberately not a registered submodule: it stays in eval mode whatever `fit` does, has no
gradients, is not in the optimizer and not in any checkpoint.

Sharded training (FSDP2 through Lightning's `ModelParallelStrategy`, `conf/trainer/fsdp.yaml`): every
use of the student runs inside one forward call of `_ModelCall`, the root FSDP unit, so the student's
embeddings, final norm and output layer are whole there while each decoder layer gathers itself in its
own forward and gradients are reduce-scattered by FSDP's backward hooks. The fused loss keeps reading the
output layer's weight directly, tile by tile. Sampling gathers the whole student for the rollout. With
`shard_teacher=True` the frozen teacher is sharded the same way behind its own root unit (`on_teacher`).
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from eopd.models import (
    decoder_layers,
    output_weight,
    remap_end_token,
    response_hidden_states,
    teacher_output_weight,
)
from eopd.objectives import LinearLogits, Metrics, Objective, TeacherStats, teacher_token_stats
from eopd.rollout import RolloutBatch, sample, teacher_hidden_states, with_prompts
from eopd.rollout_engines import ENGINES, HFEngine, RolloutEngine

log = logging.getLogger("eopd.module")

ROLLOUT_SOURCES = ("student", "teacher", "mix")
LR_SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class RolloutSpec:
    """Where responses come from and how they are sampled.

    Attributes:
        source: "student" (on-policy, the default), "teacher" (off-policy sequence-level KD, the paper's
            KD baseline) or "mix" (per rollout batch, the student with probability `lmbda`, as in GKD).
        lmbda: probability of an on-policy batch when source is "mix".
        temperature: sampling temperature; the objective scores at its own temperature and the two must
            agree (checked at construction).
        top_p: nucleus sampling; < 1 samples from a truncated distribution that the loss does not see.
        max_new_tokens: response length limit; responses that hit it are counted as truncated.
        engine: what samples the student: "hf" (`eopd.rollout.sample` on the training model, the
            default) or "vllm" (`eopd.rollout_engines.VLLMEngine`, GPU, an optional extra). Teacher
            rollouts always use "hf".
    """

    source: str = "student"
    lmbda: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    engine: str = "hf"

    def __post_init__(self) -> None:
        if self.source not in ROLLOUT_SOURCES:
            raise ValueError(
                f"rollout.source={self.source!r} is unknown; allowed: {', '.join(ROLLOUT_SOURCES)}"
            )
        if not 0.0 <= self.lmbda <= 1.0:
            raise ValueError(
                f"rollout.lmbda={self.lmbda!r} must lie in [0, 1] (probability of on-policy batches)"
            )
        if not self.temperature > 0:
            raise ValueError(
                f"rollout.temperature={self.temperature!r} must be > 0 (the paper samples at 1.0)"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"rollout.top_p={self.top_p!r} must lie in (0, 1]")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"rollout.max_new_tokens={self.max_new_tokens!r} must be a positive integer")
        if self.engine not in ENGINES:
            raise ValueError(f"rollout.engine={self.engine!r} is unknown; allowed: {', '.join(ENGINES)}")


@dataclass(frozen=True)
class UpdateSpec:
    """How a rollout batch becomes optimizer steps (paper: 128 prompts, mini-batch 32, 1 epoch: 4 steps).

    Attributes:
        mini_batch_size: prompts per optimizer step; must divide the rollout batch size.
        micro_batch_size: prompts per forward/backward inside a mini-batch (gradient accumulation); the
            loss is normalised by the mini-batch's token count, so it does not change the result.
        ppo_epochs: passes over the rollout batch.
        grad_clip: max gradient norm (0 disables clipping).
        shuffle: shuffle rows before splitting into mini-batches (seeded by step).
        max_nonfinite_in_a_row: an update whose student hidden states, loss or gradient norm are not finite
            is skipped (counted and logged as fault/skipped_updates); after this many in a row the run stops
            with `NonFiniteTraining` (0 = never stop).
    """

    mini_batch_size: int = 32
    micro_batch_size: int | None = None
    ppo_epochs: int = 1
    grad_clip: float = 1.0
    shuffle: bool = True
    max_nonfinite_in_a_row: int = 5

    def __post_init__(self) -> None:
        for name in ("mini_batch_size", "ppo_epochs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"update.{name}={value!r} must be a positive integer")
        micro = self.micro_batch_size
        if micro is not None and (not isinstance(micro, int) or micro < 1 or self.mini_batch_size % micro):
            raise ValueError(
                f"update.micro_batch_size={micro!r} must be a positive divisor of "
                f"update.mini_batch_size={self.mini_batch_size} (or null for no accumulation)"
            )
        if self.grad_clip < 0:
            raise ValueError(f"update.grad_clip={self.grad_clip!r} must be >= 0 (0 disables clipping)")
        if not isinstance(self.max_nonfinite_in_a_row, int) or self.max_nonfinite_in_a_row < 0:
            raise ValueError(
                f"update.max_nonfinite_in_a_row={self.max_nonfinite_in_a_row!r} must be an integer >= 0 "
                "(0 = never stop on non-finite updates)"
            )

    def steps_per_rollout(self, rollout_batch_size: int) -> int:
        """Optimizer steps per rollout batch."""
        if rollout_batch_size % self.mini_batch_size:
            raise ValueError(
                f"the rollout batch of {rollout_batch_size} prompts is not a multiple of "
                f"update.mini_batch_size={self.mini_batch_size}; make data.batch_size a multiple of it"
            )
        return self.ppo_epochs * (rollout_batch_size // self.mini_batch_size)


@dataclass(frozen=True)
class OptimSpec:
    """AdamW with an optional linear warm-up and a cosine or constant schedule (paper: 3e-6, cosine, wd 0.01)."""

    lr: float = 3e-6
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))
        if not self.lr > 0:
            raise ValueError(f"optimizer.lr={self.lr!r} must be > 0")
        if self.weight_decay < 0:
            raise ValueError(f"optimizer.weight_decay={self.weight_decay!r} must be >= 0")
        if self.schedule not in LR_SCHEDULES:
            raise ValueError(
                f"optimizer.schedule={self.schedule!r} is unknown; allowed: {', '.join(LR_SCHEDULES)}"
            )
        if self.warmup_steps < 0:
            raise ValueError(f"optimizer.warmup_steps={self.warmup_steps!r} must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optimizer.min_lr_ratio={self.min_lr_ratio!r} must lie in [0, 1]")

    def factor(self, step: int, total_steps: int) -> float:
        """The learning-rate multiplier at an optimizer step."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        span = max(total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class PairSpec:
    """Token-level facts about the teacher/student pair.

    Attributes:
        vocab_size: the shared vocabulary (`eopd.models.check_shared_vocabulary`); output rows past it are
            padded embeddings and are sliced off for sampling and scoring.
        pad_token_id: padding id for both models.
        student_eos_ids: ids that end a student response.
        teacher_eos_ids: ids that end a teacher response (off-policy rollouts); defaults to the student's.
        remap_end_token: (from_id, to_id): on the copy the teacher scores, replace the student's end token
            by the teacher's (PAPER.md section 3: a base student's <|endoftext|> -> the chat teacher's
            <|im_end|>). None disables it.
    """

    vocab_size: int
    pad_token_id: int
    student_eos_ids: tuple[int, ...]
    teacher_eos_ids: tuple[int, ...] | None = None
    remap_end_token: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "student_eos_ids", tuple(self.student_eos_ids))
        if self.teacher_eos_ids is None:
            object.__setattr__(self, "teacher_eos_ids", self.student_eos_ids)
        object.__setattr__(self, "teacher_eos_ids", tuple(self.teacher_eos_ids))
        if self.remap_end_token is not None:
            object.__setattr__(self, "remap_end_token", tuple(self.remap_end_token))
        ids = [*self.student_eos_ids, *self.teacher_eos_ids, self.pad_token_id, *(self.remap_end_token or ())]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"pair token ids {bad} lie outside the shared vocabulary [0, {self.vocab_size})")


@dataclass(frozen=True)
class LogSpec:
    """What is logged beyond the scalar metrics.

    Attributes:
        samples_every: rollout steps between logged samples (wandb Table and samples.jsonl); 0 = never.
        num_samples: rows per sample log.
        histograms_every: rollout steps between entropy histograms (wandb only); 0 = never.
    """

    samples_every: int = 10
    num_samples: int = 4
    histograms_every: int = 10


@dataclass
class _TeacherSide:
    stats: TeacherStats
    hidden: Tensor | None  # (B, R, H_t) kept for full-vocabulary terms and exact diagnostics


class NonFiniteTraining(RuntimeError):
    """Too many updates in a row were not finite; the message names the step and the diagnostics."""


class DistillModule(L.LightningModule):
    """On-policy distillation of `student` from a frozen `teacher` with any `Objective`.

    Args:
        student: a causal LM (Hugging Face `PreTrainedModel`), trained.
        teacher: a causal LM sharing the student's vocabulary, frozen.
        objective: the loss (`eopd.objectives.preset("eopd")` or any `Objective`).
        pair: token ids and vocabulary of the pair.
        tokenizer: the student's tokenizer, for decoding logged samples and saving with the student.
        rollout, update, optim, logging: see the Spec classes.
        seed: seeds rollouts, the rollout-source coin and mini-batch shuffling (a function of the step, so
            a resumed run draws the same).
        engine: samples the student (`eopd.rollout_engines`); an `HFEngine` when None. Its name must be
            `rollout.engine`. It is told after every rollout step that the student's weights changed.

    The dataloader yields lists of dicts with "prompt_ids" (student format) and optionally
    "teacher_prompt_ids" (teacher format; defaults to the student's) and "prompt" (text, for logs).
    """

    def __init__(
        self,
        student: torch.nn.Module,
        teacher: torch.nn.Module,
        objective: Objective,
        *,
        pair: PairSpec,
        tokenizer: Any = None,
        rollout: RolloutSpec | None = None,
        update: UpdateSpec | None = None,
        optim: OptimSpec | None = None,
        logging: LogSpec | None = None,
        seed: int = 0,
        engine: RolloutEngine | None = None,
        shard_teacher: bool = False,
    ) -> None:
        super().__init__()
        self.student = student
        object.__setattr__(self, "_student_call", _ModelCall(student))  # the root unit under FSDP
        object.__setattr__(self, "teacher", teacher)  # not a submodule: see the module docstring
        object.__setattr__(self, "_teacher_call", _ModelCall(teacher))  # its root unit when sharded
        self.shard_teacher = shard_teacher
        self.objective = objective
        self.pair = pair
        self.tokenizer = tokenizer
        self.rollout_spec = rollout or RolloutSpec()
        self.update_spec = update or UpdateSpec()
        self.optim_spec = optim or OptimSpec()
        self.log_spec = logging or LogSpec()
        self.seed = seed
        if engine is None and self.rollout_spec.engine != "hf":
            raise ValueError(
                f"rollout.engine={self.rollout_spec.engine!r} needs the engine object: "
                "DistillModule(..., engine=VLLMEngine(model_path))"
            )
        self.engine = engine if engine is not None else HFEngine()
        if self.engine.name != self.rollout_spec.engine:
            raise ValueError(
                f"the engine passed is {self.engine.name!r} but rollout.engine={self.rollout_spec.engine!r}"
            )
        self.automatic_optimization = False
        self.rollout_step = 0
        self.skipped_updates = 0  # updates skipped as not finite, over the run
        self.nonfinite_in_a_row = 0
        self.last_logs: dict[str, float] = {}
        if self.rollout_spec.temperature != objective.temperature:
            raise ValueError(
                f"rollout.temperature={self.rollout_spec.temperature} differs from the objective's scoring "
                f"temperature {objective.temperature}: sample and score at the same temperature"
            )
        if self.rollout_spec.top_p < 1:
            warnings.warn(
                f"rollout.top_p={self.rollout_spec.top_p} samples from a truncated distribution while the "
                "objective scores the full one (top-p 1.0): the rollouts are not exactly on-policy; "
                "rollout/sampler_kl_k3 measures how far off they are",
                stacklevel=2,
            )
        _freeze(teacher)
        for name, model in (("student", student), ("teacher", teacher)):
            rows = output_weight(model).shape[0]
            if rows < pair.vocab_size:
                raise ValueError(
                    f"{name} output layer has {rows} rows, fewer than the shared vocabulary {pair.vocab_size}"
                )

    # ---- Lightning plumbing ------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Shard the student with FSDP2 when the strategy gives a device mesh (ModelParallelStrategy).

        Each decoder layer is one unit, gathered for its own forward and backward; the rest (embeddings,
        final norm, output layer) belongs to the root unit `_ModelCall`. Data parallelism only: the
        tensor-parallel dimension of the mesh must be 1.
        """
        mesh = self.device_mesh
        if mesh is None or self.sharded:
            return
        from torch.distributed.fsdp import fully_shard

        if mesh["tensor_parallel"].size() != 1:
            raise ValueError(
                f"the student is sharded over data-parallel ranks only; tensor_parallel_size="
                f"{mesh['tensor_parallel'].size()} must be 1"
            )
        ranks = mesh["data_parallel"]
        for layer in decoder_layers(self.student):
            fully_shard(layer, mesh=ranks)
        fully_shard(self._student_call, mesh=ranks)
        if self.shard_teacher:  # the same units; frozen first, so FSDP keeps no gradient state for it
            _freeze(self.teacher)
            for layer in decoder_layers(self.teacher):
                fully_shard(layer, mesh=ranks)
            fully_shard(self._teacher_call, mesh=ranks)

    @property
    def sharded(self) -> bool:
        """Whether the student is sharded with FSDP (by `configure_model`)."""
        from torch.distributed.fsdp import FSDPModule

        return isinstance(self._student_call, FSDPModule)

    @property
    def teacher_sharded(self) -> bool:
        """Whether the teacher is sharded with FSDP (`shard_teacher=True` under a device mesh)."""
        from torch.distributed.fsdp import FSDPModule

        return isinstance(self._teacher_call, FSDPModule)

    def on_teacher(self, fn, *, gathered: bool = False):
        """`fn(teacher)` without gradients, with the teacher's weights usable inside it however it is placed.

        Replicated, this is `fn(self.teacher)`. Sharded, it runs inside the teacher's root unit, as
        `on_student` does for the student: decoder layers gathered one forward at a time, or all of them
        for the whole call with `gathered=True` (sampling, evaluation). Every rank must make the same calls.
        """
        if not self.teacher_sharded:
            with torch.no_grad():
                return fn(self.teacher)
        return _call_without_grad(self._teacher_call, fn, gathered)

    def student_state_dict(self) -> dict[str, Tensor]:
        """The student's full weights; under FSDP gathered from every rank's shards (call it on every rank)."""
        return {
            name: value.full_tensor() if hasattr(value, "full_tensor") else value
            for name, value in self.student.state_dict().items()
        }

    def on_student(self, fn, *, gathered: bool = False):
        """`fn(student)`, with the student's weights usable inside it however the student is sharded.

        Unsharded, this is `fn(self.student)`. Under FSDP it runs inside the root unit's forward, where each
        decoder layer gathers its weights for its own forward only; with `gathered=True` (no gradients)
        every layer is gathered once for the whole call instead, so `fn` may run any number of forwards
        without collectives (sampling, whose step count differs between ranks; evaluation). Every rank
        must make the same calls. Gradients reach FSDP's hooks only when `fn` runs with gradients enabled,
        not gathered, and returns the tensors to differentiate (a tuple, not a dataclass: FSDP hooks the
        tensors it can see).
        """
        if not self.sharded:
            return fn(self.student)
        call = self._student_call
        if not gathered and torch.is_grad_enabled():
            return call(fn)  # the backward reshards the root unit
        return _call_without_grad(call, fn, gathered)

    def on_fit_start(self) -> None:
        self.student.train()  # from_pretrained returns models in eval mode
        placed = getattr(self.teacher, "hf_device_map", None) is not None  # a device_map: leave it there
        if not (placed or self.teacher_sharded):  # FSDP placed a sharded teacher on the mesh's device
            self.teacher.to(self.device)
        _freeze(self.teacher)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return batch  # lists of prompt records: token ids move to the device when the rollout is built

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["eopd"] = {
            "rollout_step": self.rollout_step,
            "skipped_updates": self.skipped_updates,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("eopd", {})
        self.rollout_step = state.get("rollout_step", 0)
        self.skipped_updates = state.get("skipped_updates", 0)
        self.nonfinite_in_a_row = state.get("nonfinite_in_a_row", 0)

    def configure_optimizers(self):
        spec = self.optim_spec
        optimizer = torch.optim.AdamW(
            [p for p in self.student.parameters() if p.requires_grad],
            lr=spec.lr,
            weight_decay=spec.weight_decay,
            betas=spec.betas,
        )
        total = self._total_optimizer_steps()
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: spec.factor(step, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _total_optimizer_steps(self) -> int:
        trainer = getattr(self, "_trainer", None)
        if trainer is not None and trainer.max_steps and trainer.max_steps > 0:
            return trainer.max_steps
        return 1_000_000

    # ---- one training step = one rollout batch -----------------------------------------------------

    def training_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        timer = _PhaseTimer()
        with timer("rollout"):
            rollout, on_policy = self.make_rollout(batch)
        with timer("teacher"):
            teacher_side = self.score_teacher(rollout, batch)
        with timer("old_logprobs"):
            old_logprobs, diagnostics = self.score_old_policy(rollout, teacher_side)
        lr = self.optimizers().param_groups[0]["lr"]  # the rate this rollout's first update uses
        with timer("update"):
            update_metrics = self.update(rollout, teacher_side, old_logprobs)
        with timer("sync"):
            self.engine.sync_weights(self.student)
        self.rollout_step += 1

        # Under data parallelism every rank logs the metrics of the whole batch, not of its own shard.
        diagnostics, update_metrics = self._all_ranks(diagnostics), self._all_ranks(update_metrics)
        logs = {k: v for k, v in diagnostics.means().items() if not k.startswith(("loss/", "ppo/"))}
        updates = update_metrics.means()
        logs.update({k: v for k, v in updates.items() if k.startswith(("loss/", "ppo/", "train/"))})
        logs["train/loss"] = updates.get("loss/total", float("nan"))
        logs.update(self._rollout_metrics(rollout, old_logprobs, on_policy))
        logs.update({f"time/{k}": v for k, v in timer.seconds.items()})
        total = sum(timer.seconds.values())
        logs["time/step"] = total
        tokens = self._reduce(float(rollout.num_valid_tokens), "sum")
        logs["perf/tokens_per_s"] = tokens / max(total, 1e-9)  # every rank's response tokens
        logs["train/lr"] = lr
        logs["fault/skipped_updates"] = float(self.skipped_updates)
        logs["step/rollout"] = float(self.rollout_step)
        progress = {"loss": logs["train/loss"]}
        for key, short in (("div/fkl", "fkl"), ("entropy/student", "H_s"), ("gate/fraction", "gate")):
            if key in logs:
                progress[short] = logs[key]
        self.log_dict(progress, prog_bar=True, logger=False, batch_size=rollout.batch_size)
        # Logged at the optimizer step, the step validation and checkpoints use (Lightning's own step under
        # manual optimisation counts batches instead).
        self.last_logs = logs
        for logger in self.loggers:
            logger.log_metrics(logs, step=self.global_step)
        self._log_samples(batch, rollout, teacher_side)

    def make_rollout(self, batch: list[dict[str, Any]]) -> tuple[RolloutBatch, bool]:
        """Sample one response per prompt from the student (or the teacher); return it in student format."""
        spec = self.rollout_spec
        generator = torch.Generator(device=self.device).manual_seed(self._stream(0))
        if spec.source == "student":
            on_policy = True
        elif spec.source == "teacher":
            on_policy = False
        else:
            seed = self._stream(1)
            if self.sharded:  # one coin for all ranks: sampling the sharded student takes every rank
                seed -= self.global_rank  # rank 0's stream
            coin = torch.Generator().manual_seed(seed)
            on_policy = bool(torch.rand((), generator=coin) < spec.lmbda)
        student_prompts = [row["prompt_ids"] for row in batch]
        common = dict(
            max_new_tokens=spec.max_new_tokens,
            pad_token_id=self.pair.pad_token_id,
            temperature=spec.temperature,
            top_p=spec.top_p,
            generator=generator,
            vocab_size=self.pair.vocab_size,
        )
        if on_policy:
            drawn = self.on_student(
                lambda student: self.engine.generate(
                    student,
                    student_prompts,
                    eos_token_ids=self.pair.student_eos_ids,
                    seed=self._stream(0),
                    **common,
                ),
                gathered=True,  # ranks draw responses of different lengths: no per-token collectives
            )
            return drawn, True
        teacher_prompts = [row.get("teacher_prompt_ids", row["prompt_ids"]) for row in batch]
        drawn = self.on_teacher(
            lambda teacher: sample(
                teacher, teacher_prompts, eos_token_ids=self.pair.teacher_eos_ids, **common
            ),
            gathered=True,  # as for the student: ranks draw different numbers of tokens
        )
        rollout = with_prompts(drawn, student_prompts, pad_token_id=self.pair.pad_token_id)
        if self.pair.remap_end_token is not None:  # the teacher's end token, as the student would write it
            to_id, from_id = self.pair.remap_end_token
            ids = remap_end_token(rollout.input_ids, rollout.response_mask, from_id=from_id, to_id=to_id)
            rollout = RolloutBatch(
                ids,
                rollout.attention_mask,
                rollout.response_mask,
                rollout.prompt_length,
                rollout.truncated,
                rollout.sampler_logprobs,
            )
        return rollout, False

    @torch.no_grad()
    def score_teacher(self, rollout: RolloutBatch, batch: list[dict[str, Any]]) -> _TeacherSide:
        """One teacher forward on its own copy of the rollout, reduced to per-token statistics."""
        teacher_prompts = [row.get("teacher_prompt_ids", row["prompt_ids"]) for row in batch]
        hidden = self.on_teacher(
            lambda teacher: teacher_hidden_states(  # (B, R, H_t)
                teacher,
                rollout,
                teacher_prompts,
                pad_token_id=self.pair.pad_token_id,
                remap_end_token_ids=self.pair.remap_end_token,
            )
        ).to(self.device)  # a teacher placed by a device_map may end its forward on another device
        source = LinearLogits(hidden, self._teacher_weight(), self.pair.vocab_size)
        stats = teacher_token_stats(
            source,
            rollout.responses,
            k=self.objective.top_k,
            temperature=self.objective.temperature,
            chunk_size=self.objective.chunk_size,
        )
        return _TeacherSide(stats=stats, hidden=hidden)

    @torch.no_grad()
    def score_old_policy(self, rollout: RolloutBatch, teacher: _TeacherSide) -> tuple[Tensor, Metrics]:
        """One student forward: log pi_old(y_t) and every diagnostic at the rollout policy (exact, full vocab)."""
        mask = rollout.response_mask
        gates = self._gate_weights(teacher.stats.entropy, mask)
        teacher_full = LinearLogits(teacher.hidden, self._teacher_weight(), self.pair.vocab_size)

        def old_policy(model) -> tuple[Tensor, Metrics]:
            # Everything that reads the student's output layer stays inside: FSDP frees it afterwards.
            hidden = response_hidden_states(model, rollout)  # (B, R, H)
            student = LinearLogits(hidden, output_weight(model), self.pair.vocab_size)
            # One pass over the vocabulary: the diagnostics at the rollout policy, which is the old
            # policy itself (ratio 1), and log pi_old(y_t) kept from the same tiles.
            old = torch.zeros(rollout.responses.shape, dtype=torch.float32, device=hidden.device)
            diagnostics = self.objective(
                student=student,
                tokens=rollout.responses,
                mask=mask,
                teacher_stats=teacher.stats,
                teacher=teacher_full,
                gate_weights=gates,
                step=self.global_step,
                token_logprobs_out=old,
            ).metrics
            return old, diagnostics

        was_training = self.student.training
        self.student.eval()  # the policy that sampled: no dropout
        try:
            old, diagnostics = self.on_student(old_policy)
        finally:
            self.student.train(was_training)
        return old, diagnostics

    def update(self, rollout: RolloutBatch, teacher: _TeacherSide, old_logprobs: Tensor) -> Metrics:
        """ppo_epochs x mini-batches optimizer steps on the objective; returns their merged metrics."""
        spec = self.update_spec
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        n_rows = rollout.batch_size
        steps_per_epoch = self.update_spec.steps_per_rollout(n_rows) // spec.ppo_epochs
        gates = self._gate_weights(teacher.stats.entropy, rollout.response_mask)
        # DDP averages gradients over ranks; each rank's loss is already divided by the global token
        # count, so the sum over ranks is wanted: scale the average back up.
        world = self.trainer.world_size if self._distributed else 1
        teacher_weight = self._teacher_weight()
        metrics = Metrics()
        for epoch in range(spec.ppo_epochs):
            if spec.shuffle:
                order = torch.randperm(
                    n_rows, generator=torch.Generator().manual_seed(self._stream(2 + epoch))
                )
            else:
                order = torch.arange(n_rows)
            for k in range(steps_per_epoch):
                rows = order[k * spec.mini_batch_size : (k + 1) * spec.mini_batch_size].to(self.device)
                count = rollout.response_mask[rows].sum()
                count = (
                    self.trainer.strategy.reduce(count.float(), reduce_op="sum")
                    if self._distributed
                    else count
                )
                micro = spec.micro_batch_size or spec.mini_batch_size
                step_metrics = Metrics()
                for start in range(0, len(rows), micro):
                    part = rows[start : start + micro]
                    sub = rollout.select(part)
                    full_teacher = None
                    if self.objective.needs_teacher_logits:
                        full_teacher = LinearLogits(
                            teacher.hidden[part], teacher_weight, self.pair.vocab_size
                        )

                    def micro_loss(
                        model,
                        sub=sub,
                        part=part,
                        full_teacher=full_teacher,
                        count=count,
                        step_metrics=step_metrics,
                    ):
                        hidden = response_hidden_states(model, sub)  # (b, R, H)
                        if not bool(torch.isfinite(hidden[sub.response_mask]).all()):
                            # The update is skipped below; a finite stand-in keeps every rank's backward
                            # (and, sharded, every collective) in step.
                            step_metrics.add_sums("student/hidden_states", float("nan"), 1.0)
                            hidden = torch.nan_to_num(hidden, nan=0.0, posinf=0.0, neginf=0.0)
                        student = LinearLogits(hidden, output_weight(model), self.pair.vocab_size)
                        out = self.objective(
                            student=student,
                            tokens=sub.responses,
                            mask=sub.response_mask,
                            teacher_stats=teacher.stats.rows(part),
                            teacher=full_teacher,
                            old_logprobs=old_logprobs[part],
                            gate_weights=gates[:, part],
                            step=self.global_step,
                            num_valid_tokens=count,
                        )
                        return out.loss, out.metrics  # a tuple: FSDP hooks the loss for backward

                    # DDP: all-reduce once per optimizer step, on the last micro-batch's backward (the
                    # gradients accumulated before it are summed in); FSDP reduce-scatters every time.
                    last = start + micro >= len(rows)
                    hold = self._distributed and not last
                    with self.trainer.strategy.block_backward_sync() if hold else nullcontext():
                        loss, micro_metrics = self.on_student(micro_loss)
                        self.manual_backward(loss * world if world > 1 else loss)
                    step_metrics.merge([micro_metrics])
                grad_norm = self._clip_and_step(optimizer, scheduler, step_metrics)
                step_metrics.add_sums("train/grad_norm", grad_norm, 1.0)
                metrics.merge([step_metrics])
        return metrics

    def _teacher_weight(self) -> Tensor:
        """The teacher's output layer in the student's token ids (end-token rows swapped when remapped)."""
        # The teacher is frozen: build the (V, H) permuted copy once per device, not once per call.
        cached = getattr(self, "_teacher_weight_cache", None)
        if self.teacher_sharded:  # gathered whole once (every rank at the same call) and kept
            if cached is None:
                remap = self.pair.remap_end_token
                whole = self.on_teacher(lambda teacher: teacher_output_weight(teacher, remap).clone())
                object.__setattr__(self, "_teacher_weight_cache", (None, whole.to(self.device)))
            return self._teacher_weight_cache[1]
        source = output_weight(self.teacher)
        if cached is None or cached[0] != (source.data_ptr(), source.device):
            cached = (
                (source.data_ptr(), source.device),
                teacher_output_weight(self.teacher, self.pair.remap_end_token).to(self.device),
            )
            object.__setattr__(self, "_teacher_weight_cache", cached)
        return cached[1]

    def _clip_and_step(self, optimizer, scheduler, metrics: Metrics) -> float:
        params = [p for p in self.student.parameters() if p.grad is not None]
        max_norm = self.update_spec.grad_clip if self.update_spec.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.zeros(())
        # Sharded gradients are DTensors: their norm is the global one, reduced over the shards.
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        checked = ("loss/", "train/", "student/")
        losses = [metrics.sums[k] for k in metrics.sums if k.startswith(checked)]
        finite = math.isfinite(grad_norm) and (not losses or bool(torch.stack(losses).isfinite().all()))
        if self._any_rank(not finite):
            values = {**metrics.means(), "train/grad_norm": grad_norm}
            bad = {k: v for k, v in values.items() if k.startswith(checked) and not math.isfinite(v)}
            # Skip the update but still take the step: with no gradients AdamW changes nothing, and the
            # step count, LR schedule and checkpoints stay on the run's plan.
            optimizer.zero_grad(set_to_none=True)
            self._count_nonfinite(bad)
        else:
            self.nonfinite_in_a_row = 0
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        return grad_norm

    def _gate_weights(self, entropy: Tensor, mask: Tensor) -> Tensor:
        """Gate weights (n_terms, B, R) of this rank's rows, decided over the batch of ALL ranks.

        Batch-level gates (quantile, random) must see the whole rollout batch: under data parallelism the
        ranks' entropies are gathered, stacked in rank order as one batch (responses right-padded to the
        longest), gated once, and each rank keeps its own rows. A single process gets the same weights
        from the concatenated batch.
        """
        if not self._distributed:
            return self.objective.gate_weights(entropy, mask, step=self.global_step)
        entropies, widths = _gather_padded(entropy.float())
        masks, _ = _gather_padded(mask.to(torch.uint8))  # gloo gathers no bool tensors
        masks = [m.bool() for m in masks]
        rows = [e.shape[0] for e in entropies]
        width = max(widths)
        full_entropy = torch.cat([torch.nn.functional.pad(e, (0, width - e.shape[1])) for e in entropies])
        full_mask = torch.cat([torch.nn.functional.pad(m, (0, width - m.shape[1])) for m in masks])
        gates = self.objective.gate_weights(full_entropy, full_mask, step=self.global_step)
        start = sum(rows[: self.global_rank])
        return gates[:, start : start + entropy.shape[0], : entropy.shape[1]]

    def _all_ranks(self, metrics: Metrics) -> Metrics:
        """The metrics merged over all ranks (exact: sums and weights add up); unchanged on one process."""
        if not self._distributed:
            return metrics
        local = {name: (float(metrics.sums[name]), float(metrics.weights[name])) for name in metrics.sums}
        gathered: list[Any] = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(gathered, local)
        merged = Metrics()
        for shard in gathered:
            for name, (total, weight) in shard.items():
                merged.add_sums(name, total, weight)
        return merged

    def _count_nonfinite(self, bad: dict[str, float]) -> None:
        self.skipped_updates += 1
        self.nonfinite_in_a_row += 1
        limit = self.update_spec.max_nonfinite_in_a_row
        values = ", ".join(f"{k}={v}" for k, v in sorted(bad.items())) or "non-finite on another rank"
        where = f"optimizer step {self.global_step} (rollout step {self.rollout_step + 1})"
        if limit and self.nonfinite_in_a_row >= limit:
            raise NonFiniteTraining(
                f"{self.nonfinite_in_a_row} updates in a row were not finite, the last at {where}: {values}. "
                f"Stopped (update.max_nonfinite_in_a_row={limit}); the weights are those of the last finite "
                "update. Lower optimizer.lr or set update.grad_clip, then resume from the last checkpoint"
            )
        log.warning("skipped the update at %s: %s (%d in a row)", where, values, self.nonfinite_in_a_row)

    def _any_rank(self, flag: bool) -> bool:
        return self._reduce(float(flag), "sum") > 0

    @property
    def _distributed(self) -> bool:
        trainer = getattr(self, "_trainer", None)
        return trainer is not None and trainer.world_size > 1

    def _stream(self, purpose: int) -> int:
        """A seed for one purpose at this rollout step: reproducible, and the same after a resume."""
        rank = self.global_rank if self._distributed else 0
        return (self.seed * 1_000_003 + self.rollout_step * 101 + purpose) * 7919 + rank

    # ---- logging -----------------------------------------------------------------------------------

    def _rollout_metrics(
        self, rollout: RolloutBatch, old_logprobs: Tensor, on_policy: bool
    ) -> dict[str, float]:
        """Rollout statistics of the whole batch: under data parallelism summed over the ranks' shards."""
        lengths = rollout.response_lengths.float()
        mask = rollout.response_mask
        sums = Metrics()
        sums.add("rollout/len_mean", lengths)
        sums.add("rollout/truncated_frac", rollout.truncated.float())
        if on_policy and rollout.sampler_logprobs is not None:
            # On-policy guard: the sampler's log-probs against the trainer's recomputed ones.
            log_ratio = (old_logprobs - rollout.sampler_logprobs)[mask]
            sums.add("rollout/sampler_kl_k3", torch.expm1(log_ratio) - log_ratio)
            sums.add("rollout/sampler_ratio_mean", log_ratio.exp())
        logs = self._all_ranks(sums).means()
        logs["rollout/len_max"] = self._reduce(float(lengths.max()), "max")
        logs["rollout/on_policy"] = float(on_policy)  # the same on every rank (one coin)
        return logs

    def _reduce(self, value: float, op: str) -> float:
        """`value` reduced over the ranks with "sum" or "max"; itself on one process."""
        if not self._distributed:
            return value
        tensor = torch.tensor(value, dtype=torch.float64, device=self.device)
        return float(self.trainer.strategy.reduce(tensor, reduce_op=op))

    def _log_samples(self, batch: list[dict[str, Any]], rollout: RolloutBatch, teacher: _TeacherSide) -> None:
        spec = self.log_spec
        step = self.rollout_step
        want_samples = spec.samples_every > 0 and (step == 1 or step % spec.samples_every == 0)
        want_hist = spec.histograms_every > 0 and step % spec.histograms_every == 0
        want_hist = want_hist and any(type(lg).__name__ == "WandbLogger" for lg in self.loggers)
        student_entropy = None
        if want_hist and (self.sharded or self.global_rank == 0):  # sharded: a forward needs every rank
            student_entropy = self._student_entropy(rollout)
        if not (want_samples or want_hist) or self.global_rank != 0:
            return
        mask = rollout.response_mask
        if want_samples and self.tokenizer is not None:
            rows = []
            for i in range(min(spec.num_samples, rollout.batch_size)):
                ids = rollout.responses[i][mask[i]].tolist()
                entropy = teacher.stats.entropy[i][mask[i]].tolist()
                pieces = [self.tokenizer.decode([t]) for t in ids]
                rows.append(
                    {
                        "step": step,
                        "prompt": batch[i].get("prompt", self.tokenizer.decode(batch[i]["prompt_ids"])),
                        "response": self.tokenizer.decode(ids),
                        "teacher_entropy": " ".join(
                            f"{p!r}:{h:.2f}" for p, h in zip(pieces, entropy, strict=True)
                        ),
                    }
                )
            run_dir = Path(self.trainer.default_root_dir) if self._trainer is not None else None
            if run_dir is not None:
                run_dir.mkdir(parents=True, exist_ok=True)
                with open(run_dir / "samples.jsonl", "a") as f:
                    for row in rows:
                        f.write(json.dumps(row) + "\n")
            for logger in self.loggers:
                if type(logger).__name__ == "WandbLogger":
                    columns = list(rows[0]) if rows else []
                    logger.log_table(
                        "samples", columns=columns, data=[list(r.values()) for r in rows], step=step
                    )
        if want_hist:
            for logger in self.loggers:
                if type(logger).__name__ == "WandbLogger":
                    import wandb

                    logger.experiment.log(
                        {
                            "hist/teacher_entropy": wandb.Histogram(
                                teacher.stats.entropy[mask].cpu().numpy()
                            ),
                            "hist/student_entropy": wandb.Histogram(student_entropy.cpu().numpy()),
                            "trainer/global_step": self.global_step,
                        }
                    )

    @torch.no_grad()
    def _student_entropy(self, rollout: RolloutBatch) -> Tensor:
        def entropy(model) -> Tensor:
            hidden = response_hidden_states(model, rollout)[rollout.response_mask]
            source = LinearLogits(hidden, output_weight(model), self.pair.vocab_size)
            tokens = rollout.responses[rollout.response_mask]
            return teacher_token_stats(source, tokens, k=1, temperature=self.objective.temperature).entropy

        return self.on_student(entropy)


class _ModelCall(torch.nn.Module):
    """Calls `fn(model)` in its forward: under FSDP, the root unit whose forward makes the model whole."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn):
        return fn(self.model)


def _call_without_grad(call: _ModelCall, fn, gathered: bool):
    """`fn` inside the sharded root unit `call` without gradients (every layer gathered once if `gathered`)."""
    with torch.no_grad():
        out = call(_gather_layers_for(fn) if gathered else fn)
    call.reshard()  # the root keeps its weights gathered after a forward, expecting a backward
    return out


def _gather_layers_for(fn):
    """`fn` wrapped to run with every FSDP unit below the root gathered once, instead of per forward."""
    from torch.distributed.fsdp import FSDPModule

    def gathered(student):
        units = [m for m in student.modules() if isinstance(m, FSDPModule)]
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        try:
            return fn(student)
        finally:
            for unit in units:
                unit.reshard()
                unit.set_reshard_after_forward(True, recurse=False)

    return gathered


def _gather_padded(values: Tensor) -> tuple[list[Tensor], list[int]]:
    """Every rank's (B_r, R_r) tensor, in rank order, although B_r and R_r differ between ranks."""
    world = torch.distributed.get_world_size()
    shape = torch.tensor(values.shape, device=values.device)
    shapes = [torch.zeros_like(shape) for _ in range(world)]
    torch.distributed.all_gather(shapes, shape)
    rows = max(int(s[0]) for s in shapes)
    width = max(int(s[1]) for s in shapes)
    padded = values.new_zeros((rows, width))
    padded[: values.shape[0], : values.shape[1]] = values
    parts = [torch.zeros_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    out = [p[: int(s[0]), : int(s[1])] for p, s in zip(parts, shapes, strict=True)]
    return out, [int(s[1]) for s in shapes]


def _freeze(model: torch.nn.Module) -> None:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)


class _PhaseTimer:
    """Wall-clock seconds per named phase (synchronising CUDA so that the phases are honest)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        _sync()
        start = time.perf_counter()
        yield
        _sync()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


__all__ = [
    "DistillModule",
    "LogSpec",
    "NonFiniteTraining",
    "OptimSpec",
    "PairSpec",
    "RolloutSpec",
    "UpdateSpec",
]
