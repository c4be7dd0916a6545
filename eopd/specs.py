"""The knobs of a training run that the module owns: rollout, update, optimizer, pair token ids, logging.

Each is a small frozen dataclass that checks its own fields in `__post_init__`, so a bad value fails where
it is set, with the config key in the message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from eopd.rollout_engines import ENGINES

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
        n_samples: responses per prompt (the paper: 1). Each prompt's samples are adjacent rows of the
            rollout batch, a group: the group baseline of reward objectives (GRPO) is taken over them.
    """

    source: str = "student"
    lmbda: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    engine: str = "hf"
    n_samples: int = 1

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
        if not isinstance(self.n_samples, int) or self.n_samples < 1:
            raise ValueError(
                f"rollout.n_samples={self.n_samples!r} must be a positive integer (responses per prompt)"
            )


@dataclass(frozen=True)
class UpdateSpec:
    """How a rollout batch becomes optimizer steps (paper: 128 prompts, mini-batch 32, 1 epoch: 4 steps).

    Attributes:
        mini_batch_size: responses per optimizer step (prompts when rollout.n_samples is 1); must divide the
            rollout batch, data.batch_size x rollout.n_samples responses.
        micro_batch_size: responses per forward/backward inside a mini-batch (gradient accumulation); the
            loss is normalised by the mini-batch's token count, so it does not change the result.
        ppo_epochs: passes over the rollout batch.
        grad_clip: max gradient norm (0 disables clipping).
        shuffle: shuffle rows before splitting into mini-batches (seeded by step).
        max_nonfinite_in_a_row: an update whose student hidden states, loss or gradient norm are not finite
            is skipped (counted and logged as fault/skipped_updates); after this many in a row the run stops
            with `NonFiniteTraining` (0 = never stop).
        reuse_on_policy_forward: the first mini-batch of a rollout is trained before any optimizer step, at
            the rollout policy: its log pi_old(y_t) and rollout-policy diagnostics come from its own
            forward, and the separate pass at the rollout policy scores the other mini-batches only (with
            one mini-batch, none). The same numbers as that pass where the forward is batch-invariant
            (docs/performance.md); off where dropout is active or a gate reads the student's signals.
        pack_sequences: the teacher's forward, the pass at the rollout policy and the update's forwards
            run on the rows' real tokens packed into fewer rows (`eopd.scoring.Packing`) where that
            computes at least a fifth fewer positions. Forwards give the same values; gradients differ in the last bits (their
            sums over positions run in another order). Llama/Qwen3 models with SDPA attention; others unpacked.
    """

    mini_batch_size: int = 32
    micro_batch_size: int | None = None
    ppo_epochs: int = 1
    grad_clip: float = 1.0
    shuffle: bool = True
    max_nonfinite_in_a_row: int = 5
    reuse_on_policy_forward: bool = True
    pack_sequences: bool = True

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
        for name in ("reuse_on_policy_forward", "pack_sequences"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"update.{name}={getattr(self, name)!r} must be true or false")
        if self.grad_clip < 0:
            raise ValueError(f"update.grad_clip={self.grad_clip!r} must be >= 0 (0 disables clipping)")
        if not isinstance(self.max_nonfinite_in_a_row, int) or self.max_nonfinite_in_a_row < 0:
            raise ValueError(
                f"update.max_nonfinite_in_a_row={self.max_nonfinite_in_a_row!r} must be an integer >= 0 "
                "(0 = never stop on non-finite updates)"
            )

    def mini_batches(self, rollout_batch_size: int) -> int:
        """Mini-batches (optimizer steps) per pass over a rollout batch of `rollout_batch_size` responses."""
        if rollout_batch_size % self.mini_batch_size:
            raise ValueError(
                f"the rollout batch of {rollout_batch_size} responses (data.batch_size x rollout.n_samples) is "
                f"not a multiple of update.mini_batch_size={self.mini_batch_size}; make data.batch_size x "
                "rollout.n_samples a multiple of it"
            )
        return rollout_batch_size // self.mini_batch_size

    def steps_per_rollout(self, rollout_batch_size: int) -> int:
        """Optimizer steps per rollout batch: ppo_epochs x mini-batches (`optimizer_steps_per_rollout`)."""
        self.mini_batches(rollout_batch_size)  # the check
        return optimizer_steps_per_rollout(self.ppo_epochs, rollout_batch_size, self.mini_batch_size)


def optimizer_steps_per_rollout(ppo_epochs: int, rollout_batch_size: int, mini_batch_size: int) -> int:
    """ppo_epochs x (rollout batch / mini-batch): the one formula, for `UpdateSpec` and the config
    (`total_optimizer_steps` in conf/train.yaml). At least 1, so that a config with a mini-batch larger than
    the batch still composes and `plan` can report it."""
    return max(int(ppo_epochs) * (int(rollout_batch_size) // int(mini_batch_size)), 1)


@dataclass(frozen=True)
class OptimSpec:
    """AdamW with an optional linear warm-up and a cosine or constant schedule (paper: 3e-6, cosine, wd 0.01).

    Attributes:
        fused: update every parameter in one fused kernel (`torch.optim.AdamW(fused=True)`) where torch
            has one for all of them (floating-point parameters on the CPU or a CUDA device); elsewhere,
            or with False, torch's default implementation (a loop over parameters on the CPU, `foreach`
            on CUDA). The same update up to rounding (about one float32 ulp per step in some elements);
            on the CPU the fused kernel took 0.7 ms against 4.1 ms per step at a 0.6M-parameter student
            and 19 ms against 87 ms at 16M (docs/performance.md).
    """

    lr: float = 3e-6
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    fused: bool = True

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
        if not isinstance(self.fused, bool):
            raise ValueError(f"optimizer.fused={self.fused!r} must be true or false")

    def adamw(self, params: list) -> torch.optim.AdamW:
        """AdamW over `params` with these settings, fused where torch has a fused kernel for all of them."""
        fused = self.fused and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
        return torch.optim.AdamW(
            params,
            lr=self.lr,
            weight_decay=self.weight_decay,
            betas=self.betas,
            **({"fused": True} if fused else {}),
        )

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


def check_sampling_matches_scoring(rollout: RolloutSpec, scoring_temperature: float) -> None:
    """Sampling and scoring at one temperature (PAPER.md section 7: a recurring bug elsewhere).

    Raises:
        ValueError: naming both config keys and the fix.
    """
    if rollout.temperature != scoring_temperature:
        raise ValueError(
            f"config 'rollout.temperature'={rollout.temperature} differs from 'objective.temperature'="
            f"{scoring_temperature}: sample and score at the same temperature (leave objective.temperature "
            "at its default ${rollout.temperature})"
        )
