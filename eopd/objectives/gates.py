"""Gates: detached per-token weights in [0, 1] computed from the teacher's entropy.

A gate decides on which tokens an objective term acts. EOPD adds forward KL where the TEACHER's entropy is
high (PAPER.md section 2, step 4: a hard indicator 1[H_t >= tau]); the other gates are the ablations a
researcher compares it with. Every gate is called as `gate(entropy, mask, step=step)` with entropy and
mask of shape (...) and returns float weights of the same shape, zero wherever mask is False.

Gates that look at the whole batch (quantile, random) must see the whole rollout batch at once, so the
trainer evaluates them once per rollout batch, before splitting it into mini-batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from eopd.schedules import Schedule, as_schedule, schedule_range

PAPER_TAU = 0.8
"""The paper's entropy threshold in nats (PAPER.md section 2, step 4): the default tau of the hard and soft
gates and of the high/low-entropy split in every diagnostic (`Objective.diagnostic_tau`, `EvalSpec.tau`)."""


@dataclass(frozen=True)
class NoGate:
    """Every valid token: weight 1."""

    def __call__(self, entropy: Tensor, mask: Tensor, *, step: int = 0) -> Tensor:
        return mask.float()


@dataclass(frozen=True)
class HardGate:
    """1[H_t >= tau], the paper's gate (tau = 0.8 nats). `tau` may follow a schedule; +inf never opens."""

    tau: float | Schedule = PAPER_TAU

    def __post_init__(self) -> None:
        object.__setattr__(self, "tau", as_schedule(self.tau))
        if schedule_range(self.tau)[0] < 0:
            raise ValueError(
                f"tau={self.tau!r} must be >= 0 nats (entropy is never negative; the paper uses 0.8)"
            )

    def __call__(self, entropy: Tensor, mask: Tensor, *, step: int = 0) -> Tensor:
        return ((entropy >= self.tau(step)) & mask).float()


@dataclass(frozen=True)
class SoftGate:
    """sigmoid((H_t - tau) / width): a smooth version of `HardGate` (width -> 0 recovers it)."""

    tau: float | Schedule = PAPER_TAU
    width: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "tau", as_schedule(self.tau))
        if schedule_range(self.tau)[0] < 0:
            raise ValueError(f"tau={self.tau!r} must be >= 0 nats")
        if not self.width > 0:
            raise ValueError(f"width={self.width!r} must be > 0 nats (a HardGate is the width -> 0 limit)")

    def __call__(self, entropy: Tensor, mask: Tensor, *, step: int = 0) -> Tensor:
        weight = torch.sigmoid((entropy.float() - self.tau(step)) / self.width)
        return weight * mask.float()


@dataclass(frozen=True)
class QuantileGate:
    """Opens the top fraction `q` of the batch's valid tokens by teacher entropy.

    Exactly round(q * n_valid) tokens open (ties broken by position), so the gated fraction is the same
    for every teacher: a threshold that transfers across teachers, unlike an absolute tau.
    """

    q: float | Schedule = 0.2

    def __post_init__(self) -> None:
        object.__setattr__(self, "q", as_schedule(self.q))
        low, high = schedule_range(self.q)
        if low < 0 or high > 1:
            raise ValueError(f"q={self.q!r} must lie in [0, 1] (the fraction of tokens to gate)")

    def __call__(self, entropy: Tensor, mask: Tensor, *, step: int = 0) -> Tensor:
        return _open_top(entropy.float().masked_fill(~mask, float("-inf")), mask, self.q(step))


@dataclass(frozen=True)
class RandomGate:
    """Opens as many tokens as `match` would, chosen uniformly at random among the valid ones.

    The paper's placement ablation: same amount of forward KL, placed without regard to entropy. For a
    soft `match` the count is its total weight, rounded. The draw depends only on (seed, step), so a
    resumed run draws the same tokens.
    """

    match: NoGate | HardGate | SoftGate | QuantileGate = field(default_factory=HardGate)
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.match, RandomGate):
            raise ValueError("RandomGate(match=...) must match an entropy gate, not another RandomGate")

    def __call__(self, entropy: Tensor, mask: Tensor, *, step: int = 0) -> Tensor:
        n_valid = int(mask.sum())
        fraction = float(self.match(entropy, mask, step=step).sum()) / max(n_valid, 1)
        generator = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + step)
        noise = torch.rand(mask.shape, generator=generator).to(mask.device)
        return _open_top(noise.masked_fill(~mask, float("-inf")), mask, fraction)


Gate = NoGate | HardGate | SoftGate | QuantileGate | RandomGate


def _open_top(scores: Tensor, mask: Tensor, fraction: float) -> Tensor:
    """Weights 1 on the round(fraction * n_valid) highest-scoring valid positions, 0 elsewhere."""
    n_valid = int(mask.sum())
    n_open = min(int(math.floor(fraction * n_valid + 0.5)), n_valid)
    weights = torch.zeros(mask.numel(), device=mask.device)
    if n_open > 0:
        # A stable sort breaks ties by position, so the same inputs always open the same tokens.
        order = torch.sort(scores.reshape(-1), descending=True, stable=True).indices
        weights[order[:n_open]] = 1.0
    return weights.reshape(mask.shape)
