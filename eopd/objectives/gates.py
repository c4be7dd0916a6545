"""Gates: detached per-token weights in [0, 1] computed from a per-token signal.

A gate decides on which tokens an objective term acts. EOPD adds forward KL where the TEACHER's entropy is
high (PAPER.md section 2, step 4: a hard indicator 1[H_t >= tau]); the other gates are the ablations a
researcher compares it with, and the token-selection rules of later papers. Which signal a gate reads is
a choice (`signal=`, one of `SIGNALS`): the teacher's entropy (the default, EOPD's), the student's
entropy, or a divergence between the two, all measured at the rollout policy. `AllOf`, `AnyOf` and
`Not` combine gates, so a rule over two axes (e.g. "high student entropy, or low student entropy and high
divergence") is a composition rather than a new class.

Every gate is called as `gate(signals, mask, step=step)` with a `Signals` (or, for the teacher's entropy
alone, a tensor) and a mask of shape (...), and returns float weights of the same shape, zero wherever
mask is False. Gates that look at the whole batch (quantile, random) must see the whole rollout batch at
once, so the trainer evaluates them once per rollout batch, before splitting it into mini-batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from eopd.schedules import Schedule, as_schedule, schedule_range

PAPER_TAU = 0.8
"""The paper's entropy threshold in nats (PAPER.md section 2, step 4): the default tau of the hard and soft
gates and of the high/low-entropy split in every diagnostic (`Objective.diagnostic_tau`, `EvalSpec.tau`)."""


SIGNALS = ("teacher_entropy", "student_entropy", "fkl", "rkl", "log_ratio", "abs_log_ratio")
"""What a gate can read, per token, at the rollout policy (nats): the teacher's and the student's entropy,
the exact full-vocabulary KL(teacher || student) and KL(student || teacher), and the sampled token's
log pi_s(y) - log pi_t(y) (its mean over the student's samples is the reverse KL) and its absolute value."""

STUDENT_SIGNALS = frozenset(SIGNALS) - {"teacher_entropy"}
"""The signals that need the student's distribution at the rollout policy (known after its scoring pass)."""

FULL_VOCABULARY_SIGNALS = frozenset({"fkl", "rkl"})
"""The signals that need the teacher's full distribution, not only its top-k statistics."""


@dataclass(frozen=True)
class Signals:
    """The per-token signals a gate reads, each shaped like the mask; None where not measured."""

    teacher_entropy: Tensor
    student_entropy: Tensor | None = None
    fkl: Tensor | None = None
    rkl: Tensor | None = None
    log_ratio: Tensor | None = None

    @property
    def abs_log_ratio(self) -> Tensor | None:
        return None if self.log_ratio is None else self.log_ratio.abs()

    def get(self, name: str) -> Tensor:
        value = getattr(self, name) if name in SIGNALS else None
        if value is None:
            measured = [n for n in SIGNALS if getattr(self, n) is not None]
            raise ValueError(
                f"a gate reads signal {name!r}, which was not measured (measured: {', '.join(measured)}); "
                "student-side signals come from the pass at the rollout policy, fkl and rkl also need the "
                "teacher's logits"
            )
        return value

    @classmethod
    def spread(
        cls, teacher_entropy: Tensor, mask: Tensor, flat: dict[str, Tensor], measured: tuple[str, ...]
    ) -> Signals:
        """The `measured` signals (...) from per-token values (N,) at the valid positions of `mask`, zero
        elsewhere (all zero when no token is valid and `flat` holds nothing); the others None."""

        def full(name: str) -> Tensor:
            values = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
            if name in flat:
                values[mask] = flat[name].float()
            return values

        return cls(teacher_entropy=teacher_entropy, **{name: full(name) for name in measured})

    def map(self, fn) -> Signals:
        """The same signals with `fn` applied to each measured tensor (e.g. a gather over ranks)."""
        return Signals(
            **{
                f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                for f in fields(self)
            }
        )


def as_signals(signals: Signals | Tensor) -> Signals:
    """A `Signals`; a bare tensor is the teacher's entropy (what every gate read before signals existed)."""
    return signals if isinstance(signals, Signals) else Signals(teacher_entropy=signals)


def _min_max(values: Tensor, mask: Tensor) -> Tensor:
    """(values - min) / (max - min) over the valid tokens; 0 everywhere when they are all equal."""
    values = values.float()
    if not bool(mask.any()):
        return torch.zeros_like(values)
    low, high = values[mask].min(), values[mask].max()
    span = high - low
    if not span > 0:
        return torch.zeros_like(values)
    return ((values - low) / span).masked_fill(~mask, 0.0)


@dataclass(frozen=True)
class SoftOr:
    """TIP's score over two axes (2604.14084, Eq. 5): a + b - a b of the two signals min-max normalised
    over the batch's valid tokens. High when either is high; "student_entropy" and "rkl" is the paper's.

    `clip_quantile` first clips the first signal at that quantile of its valid values (TIP clips the
    student's entropy at the batch's 98th percentile, so that a few very uncertain tokens do not squash
    the normalised scale of the rest); None: no clip.
    """

    first: str = "student_entropy"
    second: str = "rkl"
    clip_quantile: float | None = None

    def __post_init__(self) -> None:
        _check_signal(self.first)
        _check_signal(self.second)
        if self.clip_quantile is not None and not 0.0 < self.clip_quantile <= 1.0:
            raise ValueError(f"clip_quantile={self.clip_quantile!r} must lie in (0, 1] (TIP clips at 0.98)")

    @property
    def names(self) -> frozenset[str]:
        return frozenset({self.first, self.second})

    def __call__(self, signals: Signals, mask: Tensor) -> Tensor:
        first = signals.get(self.first).float()
        if self.clip_quantile is not None and bool(mask.any()):
            first = first.clamp(max=torch.quantile(first[mask], self.clip_quantile))
        a = _min_max(first, mask)
        b = _min_max(signals.get(self.second), mask)
        return a + b - a * b


@dataclass(frozen=True)
class Overconfident:
    """TIP's score for confident, wrong tokens (2604.14084, section 7.3): divergence x (1 - entropy min-max
    normalised over the batch). The paper's divergence here is the forward KL."""

    divergence: str = "fkl"
    entropy: str = "student_entropy"

    def __post_init__(self) -> None:
        _check_signal(self.divergence)
        _check_signal(self.entropy)

    @property
    def names(self) -> frozenset[str]:
        return frozenset({self.divergence, self.entropy})

    def __call__(self, signals: Signals, mask: Tensor) -> Tensor:
        return signals.get(self.divergence).float() * (1.0 - _min_max(signals.get(self.entropy), mask))


Score = SoftOr | Overconfident
"""A signal made of two: what a gate's `signal` may be besides one of `SIGNALS`."""


def _check_signal(signal: str | Score) -> None:
    if isinstance(signal, SoftOr | Overconfident):
        return
    if signal not in SIGNALS:
        raise ValueError(
            f"signal={signal!r} is unknown; allowed: {', '.join(SIGNALS)}, SoftOr, Overconfident"
        )


def _names(signal: str | Score) -> frozenset[str]:
    return signal.names if isinstance(signal, SoftOr | Overconfident) else frozenset({signal})


def _value(signal: str | Score, signals: Signals | Tensor, mask: Tensor) -> Tensor:
    signals = as_signals(signals)
    return signal(signals, mask) if isinstance(signal, SoftOr | Overconfident) else signals.get(signal)


@dataclass(frozen=True)
class NoGate:
    """Every valid token: weight 1."""

    @property
    def signals(self) -> frozenset[str]:
        return frozenset()

    def __call__(self, signals: Signals | Tensor, mask: Tensor, *, step: int = 0) -> Tensor:
        return mask.float()


@dataclass(frozen=True)
class HardGate:
    """1[signal >= tau]. The paper's gate is the default: the teacher's entropy, tau = 0.8 nats. `tau` may
    follow a schedule; +inf never opens."""

    tau: float | Schedule = PAPER_TAU
    signal: str | Score = "teacher_entropy"

    def __post_init__(self) -> None:
        object.__setattr__(self, "tau", as_schedule(self.tau))
        _check_signal(self.signal)
        if schedule_range(self.tau)[0] < 0 and self.signal != "log_ratio":
            raise ValueError(
                f"tau={self.tau!r} must be >= 0 ({self.signal} is never negative; the paper uses 0.8 nats)"
            )

    @property
    def signals(self) -> frozenset[str]:
        return _names(self.signal)

    def __call__(self, signals: Signals | Tensor, mask: Tensor, *, step: int = 0) -> Tensor:
        return ((_value(self.signal, signals, mask) >= self.tau(step)) & mask).float()


@dataclass(frozen=True)
class SoftGate:
    """sigmoid((signal - tau) / width): a smooth version of `HardGate` (width -> 0 recovers it)."""

    tau: float | Schedule = PAPER_TAU
    width: float = 0.1
    signal: str | Score = "teacher_entropy"

    def __post_init__(self) -> None:
        object.__setattr__(self, "tau", as_schedule(self.tau))
        _check_signal(self.signal)
        if schedule_range(self.tau)[0] < 0 and self.signal != "log_ratio":
            raise ValueError(f"tau={self.tau!r} must be >= 0 nats")
        if not self.width > 0:
            raise ValueError(f"width={self.width!r} must be > 0 nats (a HardGate is the width -> 0 limit)")

    @property
    def signals(self) -> frozenset[str]:
        return _names(self.signal)

    def __call__(self, signals: Signals | Tensor, mask: Tensor, *, step: int = 0) -> Tensor:
        value = _value(self.signal, signals, mask).float()
        return torch.sigmoid((value - self.tau(step)) / self.width) * mask.float()


@dataclass(frozen=True)
class QuantileGate:
    """Opens the top fraction `q` of the batch's valid tokens by `signal` (the teacher's entropy by default).

    Exactly round(q * n_valid) tokens open (ties broken by position), so the gated fraction is the same
    for every teacher: a threshold that transfers across teachers, unlike an absolute tau. With
    `per_response`, each response (a row of the mask) opens floor(q * its valid tokens) of its own
    highest-scoring tokens instead (TIP's rule): no response goes unsupervised because others score
    higher. The scores are still computed over the whole batch (a min-max score normalises over it).
    """

    q: float | Schedule = 0.2
    signal: str | Score = "teacher_entropy"
    per_response: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "q", as_schedule(self.q))
        _check_signal(self.signal)
        low, high = schedule_range(self.q)
        if low < 0 or high > 1:
            raise ValueError(f"q={self.q!r} must lie in [0, 1] (the fraction of tokens to gate)")

    @property
    def signals(self) -> frozenset[str]:
        return _names(self.signal)

    def __call__(self, signals: Signals | Tensor, mask: Tensor, *, step: int = 0) -> Tensor:
        value = _value(self.signal, signals, mask).float().masked_fill(~mask, float("-inf"))
        if self.per_response:
            return _open_top_per_row(value, mask, self.q(step))
        return _open_top(value, mask, self.q(step))


@dataclass(frozen=True)
class _Combination:
    """Gates combined into one: what `AllOf` and `AnyOf` share."""

    gates: tuple

    def __post_init__(self) -> None:
        object.__setattr__(self, "gates", tuple(self.gates))
        if not self.gates:
            raise ValueError(f"{type(self).__name__} needs at least one gate")

    @property
    def signals(self) -> frozenset[str]:
        return frozenset().union(*(g.signals for g in self.gates))


@dataclass(frozen=True)
class AllOf(_Combination):
    """The product of its gates' weights: for hard gates, the tokens every one of them opens."""

    def __call__(self, signals: Signals | Tensor, mask: Tensor, *, step: int = 0) -> Tensor:
        weight = mask.float()
        for gate in self.gates:
            weight = weight * gate(signals, mask, step=step)
        return weight


@dataclass(frozen=True)
class AnyOf(_Combination):
    """The largest of its gates' weights: for hard gates, the tokens any one of them opens."""

    def __call__(self, signals: Signals | Tensor, mask: Tensor, *, step: int = 0) -> Tensor:
        return torch.stack([gate(signals, mask, step=step) for gate in self.gates]).amax(0)


@dataclass(frozen=True)
class Not:
    """1 - its gate's weight on valid tokens: the tokens it leaves closed."""

    gate: object

    @property
    def signals(self) -> frozenset[str]:
        return self.gate.signals

    def __call__(self, signals: Signals | Tensor, mask: Tensor, *, step: int = 0) -> Tensor:
        return (1.0 - self.gate(signals, mask, step=step)) * mask.float()


@dataclass(frozen=True)
class RandomGate:
    """Opens as many tokens as `match` would, chosen uniformly at random among the valid ones.

    The paper's placement ablation: same amount of forward KL, placed without regard to entropy. For a
    soft `match` the count is its total weight, rounded. The draw depends only on (seed, step), so a
    resumed run draws the same tokens.
    """

    match: object = field(default_factory=HardGate)
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.match, RandomGate):
            raise ValueError("RandomGate(match=...) must match a signal gate, not another RandomGate")

    @property
    def signals(self) -> frozenset[str]:
        return self.match.signals

    def __call__(self, signals: Signals | Tensor, mask: Tensor, *, step: int = 0) -> Tensor:
        n_valid = int(mask.sum())
        fraction = float(self.match(signals, mask, step=step).sum()) / max(n_valid, 1)
        generator = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + step)
        noise = torch.rand(mask.shape, generator=generator).to(mask.device)
        return _open_top(noise.masked_fill(~mask, float("-inf")), mask, fraction)


Gate = NoGate | HardGate | SoftGate | QuantileGate | RandomGate | AllOf | AnyOf | Not


def _open_top_per_row(scores: Tensor, mask: Tensor, fraction: float) -> Tensor:
    """Weights 1 on each row's floor(fraction * its valid tokens) highest-scoring valid positions.

    Args:
        scores: (rows, positions) with -inf at invalid positions; mask: the same shape.
    """
    if mask.ndim != 2:
        raise ValueError(
            f"a per-response gate needs a (responses, positions) mask, got shape {tuple(mask.shape)}"
        )
    counts = torch.floor(
        mask.sum(-1).double() * fraction + 1e-9
    ).long()  # (rows,); 1e-9: 0.29 * 100 is 28.99.. in floats
    # A stable sort breaks ties by position, so the same inputs always open the same tokens.
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(mask.shape[-1], device=mask.device).expand_as(order))
    return ((rank < counts[:, None]) & mask).float()


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
