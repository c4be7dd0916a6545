"""The term registry: every kind of summand an `Objective` can hold, with its closed-form derivative.

One registry, `TERM_KINDS`, maps a kind's name to what it computes on a tile of the student's log-probs,
what it needs (the teacher's full logits, the old policy's log-probs), its options and, where known, the
derivative that lets the objective skip autograd through the full-vocabulary softmax. `DIVERGENCES`, the
public per-token functions of logits, is read off it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from eopd.objectives import divergences as D
from eopd.objectives.gates import Gate, NoGate
from eopd.objectives.policy_gradient import (
    check_clip_range,
    check_dual_clip,
    ppo_clipped_reverse_kl,
    ppo_clipped_surrogate,
)
from eopd.objectives.teacher_stats import TeacherStats
from eopd.objectives.tile_softmax import Softmaxed, pair_combination
from eopd.schedules import Schedule, as_schedule, schedule_range


@dataclass
class Tile:
    """The detached per-token data of one tile of valid positions, all (n, ...)."""

    tokens: Tensor
    old_logprobs: Tensor | None
    stats: TeacherStats
    # The teacher's full distribution on this tile, when the objective has its logits: as (n, V) log-probs
    # and probabilities on the autograd path, unnormalised (`Softmaxed`) on the closed-form path.
    teacher_logp: Tensor | None
    teacher_p: Tensor | None = None
    teacher: Softmaxed | None = None
    advantages: Tensor | None = None  # (n,) a task reward's advantage, for "ppo_reward"
    # (n,) per-token values the diagnostics computed: "student_entropy", and "fkl", "rkl" (the exact KLs)
    # with the teacher's distribution; the dense terms' values are read from here
    known: Mapping[str, Tensor] | None = None


# A term function maps the student's log-probs of a tile (n, V), differentiable, to per-token values (n,).
TermFn = Callable[[Tensor, Tile, Mapping[str, Any]], Tensor]
# A sparse term depends on the student only through its log-probs at a few vocabulary ids per token:
# `support` gives those ids (n, m), `gathered` maps the log-probs there (n, m) to per-token values (n,).
SupportFn = Callable[[Tile, Mapping[str, Any]], Tensor]
GatheredFn = Callable[[Tensor, Tile, Mapping[str, Any]], Tensor]
# A dense term with a closed-form derivative: dense(student, tile, options, scale, consume) -> (values (n,),
# scale x G (n, V), or None when scale is None), G = d values / d logp with sum_v G_v = 0 (the representative
# below), which makes G the gradient with respect to the logits (times T). The student's tile comes
# unnormalised (`Softmaxed`), the teacher's as `tile.teacher`; the values are the diagnostics' exact ones in
# `tile.known`. The returned tensor is the caller's to overwrite; with consume, the function may build it
# in the memory of tile.teacher, which nothing reads afterwards.
DenseFn = Callable[[Softmaxed, Tile, Mapping[str, Any], Tensor | None, bool], tuple[Tensor, Tensor | None]]


@dataclass(frozen=True)
class TermKind:
    """What a kind of term computes, what it needs, and which options it takes (with defaults).

    `support` and `gathered` (optional, for terms that read the student's log-probs at a few ids only,
    when `sparse_if(options)` holds), or `dense` (a full-vocabulary term whose derivative with respect to
    the log-probs is known in closed form) let the objective skip autograd through the full-vocabulary
    softmax: the tile's gradient is then formed in closed form (see `eopd.objectives.closed_form.loss_and_grad`).
    """

    fn: TermFn
    needs_teacher_logits: bool = False
    needs_old_logprobs: bool = False
    needs_advantages: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)
    doc: str = ""
    support: SupportFn | None = None
    gathered: GatheredFn | None = None
    sparse_if: Callable[[Mapping[str, Any]], bool] = lambda options: True
    dense: DenseFn | None = None
    divergence: Callable[..., Tensor] | None = None


def _ppo_support(tile: Tile, opt: Mapping[str, Any]) -> Tensor:
    return tile.tokens[:, None]  # (n, 1)


def _ppo_gathered(at_tokens: Tensor, tile: Tile, opt: Mapping[str, Any]) -> Tensor:
    return ppo_clipped_reverse_kl(
        at_tokens[:, 0],
        tile.old_logprobs,
        tile.stats.token_logprobs,
        eps_low=opt["eps_low"],
        eps_high=opt["eps_high"],
        reward_floor=opt["reward_floor"],
        dual_clip=opt["dual_clip"],
    ).loss


def _ppo(logp: Tensor, tile: Tile, opt: Mapping[str, Any]) -> Tensor:
    return _ppo_gathered(logp.gather(-1, _ppo_support(tile, opt)), tile, opt)


def _reward_gathered(at_tokens: Tensor, tile: Tile, opt: Mapping[str, Any]) -> Tensor:
    return ppo_clipped_surrogate(
        at_tokens[:, 0],
        tile.old_logprobs,
        tile.advantages,
        eps_low=opt["eps_low"],
        eps_high=opt["eps_high"],
        dual_clip=opt["dual_clip"],
    ).loss


def _reward(logp: Tensor, tile: Tile, opt: Mapping[str, Any]) -> Tensor:
    return _reward_gathered(logp.gather(-1, _ppo_support(tile, opt)), tile, opt)


def _topk_support(tile: Tile, opt: Mapping[str, Any]) -> Tensor:
    return tile.stats.topk_indices[:, : opt["k"]]  # (n, k)


def _topk_gathered(at_topk: Tensor, tile: Tile, opt: Mapping[str, Any]) -> Tensor:
    # The same tested function, on log-probs already gathered at the top-k: position j holds id j.
    k = opt["k"]
    local = torch.arange(k, device=at_topk.device).expand_as(at_topk)
    return D.topk_forward_kl_given_log_probs(at_topk, tile.stats.topk_logprobs[:, :k], local, tail="renorm")


def _topk_fkl(logp: Tensor, tile: Tile, opt: Mapping[str, Any]) -> Tensor:
    k = opt["k"]
    return D.topk_forward_kl_given_log_probs(
        logp, tile.stats.topk_logprobs[:, :k], tile.stats.topk_indices[:, :k], tail=opt["tail"]
    )


def _full(divergence: Callable[..., Tensor]) -> TermFn:
    # Each term reuses the public, tested function on the log-probs the tile computed once.
    def term(logp: Tensor, tile: Tile, opt: Mapping[str, Any]) -> Tensor:
        return divergence(logp, tile.teacher_logp, normalized=True, **opt)

    return term


def _entropy_bonus(logp: Tensor, tile: Tile, opt: Mapping[str, Any]) -> Tensor:
    return (logp.exp() * logp).sum(-1)  # = -H(student): minimising it raises the student's entropy


# Closed-form derivatives G = d values / d logp, from the definitions (logp = log p, p = exp(logp)):
#   KL(t||s) = sum p_t (log p_t - log p)     -> G = -p_t
#   KL(s||t) = sum p (log p - log p_t)       -> G = p (log p - log p_t + 1)
#   -H(s)    = sum p log p                   -> G = p (log p + 1)
# The log-probs stay on the simplex, so G + c p gives the same gradient for any c per row; each function
# returns the representative with sum_v G_v = 0 (c = -sum_v G_v), which is also the gradient itself up to
# 1/T and avoids subtracting two large, nearly equal rows: p - p_t, p (log p - log p_t - KL), p (log p + H).
# With log p = shifted - log s and p = e / s (`Softmaxed`), the per-row constants and 1/s fold into the
# scale, so that no term forms log p or p in full.
def _forward_kl_dense(student: Softmaxed, tile: Tile, opt, scale: Tensor | None, consume: bool):
    values = tile.known["fkl"]
    if scale is None:
        return values, None
    teacher = tile.teacher
    # c (p - p_t) = e (c / s) - e_t (c / s_t); a consumed teacher's z - max is no longer read: its memory
    # takes the gradient.
    grad = pair_combination(
        student.e,
        teacher.e,
        scale / student.sums.squeeze(-1),
        -scale / teacher.sums.squeeze(-1),
        out=teacher.shifted if consume else None,
    )
    if consume:
        tile.teacher = None
    return values, grad


def _reverse_kl_dense(student: Softmaxed, tile: Tile, opt, scale: Tensor | None, consume: bool):
    values = tile.known["rkl"]
    if scale is None:
        return values, None
    teacher = tile.teacher
    # log p - log p_t - KL = shifted - shifted_t + (log s_t - log s - KL)
    grad = torch.sub(student.shifted, teacher.shifted, out=teacher.shifted if consume else None)
    if consume:
        tile.teacher = None
    constant = teacher.log_sums - student.log_sums - values
    return values, grad.add_(constant[:, None]).mul_(student.e).mul_(
        (scale / student.sums.squeeze(-1))[:, None]
    )


def _entropy_bonus_dense(student: Softmaxed, tile: Tile, opt, scale: Tensor | None, consume: bool):
    values = -tile.known["student_entropy"]  # sum p log p
    if scale is None:
        return values, None
    grad = torch.add(student.shifted, (-student.log_sums - values)[:, None])  # log p - values
    return values, grad.mul_(student.e).mul_((scale / student.sums.squeeze(-1))[:, None])


TERM_KINDS: dict[str, TermKind] = {
    "ppo_rkl": TermKind(
        _ppo,
        needs_old_logprobs=True,
        options={"eps_low": 0.2, "eps_high": 0.2, "reward_floor": None, "dual_clip": None},
        doc="PPO-clipped sampled-token reverse KL, advantage log p_te(y) - log p_old(y) (the OPD term); "
        "reward_floor clips the advantage from below (REOPOLD), dual_clip caps the loss where it is negative",
        support=_ppo_support,
        gathered=_ppo_gathered,
    ),
    "ppo_reward": TermKind(
        _reward,
        needs_old_logprobs=True,
        needs_advantages=True,
        options={"eps_low": 0.2, "eps_high": 0.2, "dual_clip": None},
        doc="PPO-clipped sampled-token surrogate on a task reward's advantage (GRPO's loss; no teacher)",
        support=_ppo_support,
        gathered=_reward_gathered,
    ),
    "topk_fkl": TermKind(
        _topk_fkl,
        options={"k": 16, "tail": "renorm"},
        doc="forward KL over the teacher's top-k, student log-probs from its full softmax",
        support=_topk_support,
        gathered=_topk_gathered,
        # The bucket tail reads the student's mass outside the top-k, i.e. the whole vocabulary.
        sparse_if=lambda options: options["tail"] == "renorm",
        divergence=D.topk_forward_kl,
    ),
    "forward_kl": TermKind(
        _full(D.forward_kl),
        divergence=D.forward_kl,
        needs_teacher_logits=True,
        doc="full-vocabulary KL(teacher||student)",
        dense=_forward_kl_dense,
    ),
    "reverse_kl": TermKind(
        _full(D.reverse_kl),
        divergence=D.reverse_kl,
        needs_teacher_logits=True,
        doc="full-vocabulary KL(student||teacher)",
        dense=_reverse_kl_dense,
    ),
    "generalized_jsd": TermKind(
        _full(D.generalized_jsd),
        divergence=D.generalized_jsd,
        needs_teacher_logits=True,
        options={"beta": 0.5},
        doc="generalised JSD",
    ),
    "skew_forward_kl": TermKind(
        _full(D.skew_forward_kl),
        divergence=D.skew_forward_kl,
        needs_teacher_logits=True,
        options={"alpha": 0.1},
        doc="skew forward KL",
    ),
    "skew_reverse_kl": TermKind(
        _full(D.skew_reverse_kl),
        divergence=D.skew_reverse_kl,
        needs_teacher_logits=True,
        options={"alpha": 0.1},
        doc="skew reverse KL",
    ),
    "total_variation": TermKind(
        _full(D.total_variation),
        divergence=D.total_variation,
        needs_teacher_logits=True,
        doc="total variation",
    ),
    "entropy_bonus": TermKind(
        _entropy_bonus, doc="minus the student's entropy (an entropy bonus)", dense=_entropy_bonus_dense
    ),
}


@dataclass(frozen=True)
class Term:
    """One summand of an objective: weight(step) x gate(signals) x divergence, over a normaliser.

    Attributes:
        kind: a key of `TERM_KINDS` (e.g. "ppo_rkl", "topk_fkl", "forward_kl").
        weight: a non-negative number or schedule over optimizer steps (the paper's alpha for "topk_fkl").
        gate: which tokens the term acts on (`NoGate` = all).
        options: the kind's options (e.g. {"k": 16, "tail": "renorm"}); unknown keys are an error.
        name: the log name (`loss/<name>`); defaults to the kind.
        normalize: what the term's sum over tokens is divided by (`NORMALIZERS`): "tokens", every valid
            token of the batch (the paper's token mean, the default); "gate", the term's own gate weight
            (a mean over the tokens it selects, as TIP and REOPOLD average); "selected", the tokens that
            any "selected" term's gate opens (their union: a mean over every supervised token, as SEAD
            skips the rest).
    """

    kind: str
    weight: float | Schedule = 1.0
    gate: Gate = field(default_factory=NoGate)
    options: Mapping[str, Any] = field(default_factory=dict)
    name: str | None = None
    normalize: str = "tokens"

    def __post_init__(self) -> None:
        if self.kind not in TERM_KINDS:
            raise ValueError(f"term kind {self.kind!r} is unknown; allowed: {', '.join(TERM_KINDS)}")
        spec = TERM_KINDS[self.kind]
        unknown = set(self.options) - set(spec.options)
        if unknown:
            allowed = ", ".join(spec.options) or "none"
            raise ValueError(f"term {self.kind!r} got unknown options {sorted(unknown)}; allowed: {allowed}")
        object.__setattr__(self, "options", MappingProxyType({**spec.options, **self.options}))
        object.__setattr__(self, "weight", as_schedule(self.weight))
        if schedule_range(self.weight)[0] < 0:
            raise ValueError(f"weight of term {self.kind!r} is {self.weight!r}; weights must be >= 0")
        if self.name is None:
            object.__setattr__(self, "name", self.kind)
        if self.normalize not in NORMALIZERS:
            raise ValueError(
                f"normalize={self.normalize!r} of term {self.name!r} is unknown; allowed: {', '.join(NORMALIZERS)}"
            )
        _check_options(self.kind, self.options)

    @property
    def spec(self) -> TermKind:
        return TERM_KINDS[self.kind]

    @property
    def sparse(self) -> bool:
        """True when the term reads the student's log-probs only at a few ids per token (`TermKind`)."""
        return self.spec.support is not None and self.spec.sparse_if(self.options)

    @property
    def closed_form(self) -> bool:
        """True when the term's gradient can be formed without autograd: sparse, or dense with `dense`."""
        return self.sparse or self.spec.dense is not None


NORMALIZERS = ("tokens", "gate", "selected")


def normalizer_weights(terms: tuple[Term, ...], gates: Tensor, mask: Tensor) -> Tensor:
    """Per-term weights (n_terms, ...) whose sum over a batch is each term's normaliser (`Term.normalize`).

    Args:
        gates: (n_terms, ...) the terms' gate weights; mask: (...) valid tokens.
    """
    selected = [i for i, t in enumerate(terms) if t.normalize == "selected"]
    union = gates[selected].amax(0) if selected else None
    rows = []
    for i, term in enumerate(terms):
        if term.normalize == "gate":
            rows.append(gates[i].float())
        elif term.normalize == "selected":
            rows.append(union.float())
        else:
            rows.append(mask.float())
    return torch.stack(rows)


def _check_options(kind: str, opt: Mapping[str, Any]) -> None:
    if kind in ("ppo_rkl", "ppo_reward"):
        check_clip_range(opt["eps_low"], opt["eps_high"])
        check_dual_clip(opt["dual_clip"])
    if opt.get("reward_floor") is not None and not opt["reward_floor"] < 0:
        raise ValueError(
            f"reward_floor={opt['reward_floor']!r} must be < 0 (REOPOLD's floor log(lambda) / (1 - lambda) "
            "is -1.72 at lambda 0.3)"
        )
    if kind == "topk_fkl":
        D.check_top_k(opt["k"])
        if opt["tail"] not in D.TAIL_MODES:
            raise ValueError(f"tail={opt['tail']!r} is not a tail mode; allowed: {', '.join(D.TAIL_MODES)}")
    for name in ("beta", "alpha"):
        if name in opt and not 0.0 <= opt[name] <= 1.0:
            raise ValueError(f"{name}={opt[name]!r} of term {kind!r} must lie in [0, 1]")


DIVERGENCES: dict[str, Callable[..., Tensor]] = {
    kind.divergence.__name__: kind.divergence for kind in TERM_KINDS.values() if kind.divergence is not None
}
"""Every full-vocabulary divergence of the registry by its function's name:
f(student_logits, teacher_logits, **options) -> per-token values."""
