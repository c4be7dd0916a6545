"""The composed distillation objective: a sum of terms, each a divergence x a gate x a weight.

    L = (1 / N_valid) * sum_t sum_i weight_i(step) * gate_i(H_t) * D_i(t)

with N_valid the number of valid response tokens of the whole rollout batch (PAPER.md section 2, step 5).
The paper's EOPD is two terms: the PPO-clipped sampled reverse KL on every token, plus forward KL over the
teacher's top-16 gated by 1[H_t >= 0.8] with weight alpha = 1 (`preset("eopd")`); OPD is the first term
alone (`preset("opd")`).

Every call also returns detached diagnostics (`Metrics`) whatever the objective trains: divergences,
entropies, gate statistics, PPO statistics. Log keys are slash-namespaced (`div/fkl_high_entropy`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

import torch
from torch import Tensor

from eopd.objectives import divergences as D
from eopd.objectives.fused import LinearLogits, LogitSource, source_rows, source_tile, tiled_loss
from eopd.objectives.gates import Gate, HardGate, NoGate, QuantileGate, RandomGate, SoftGate
from eopd.objectives.policy_gradient import check_clip_range, ppo_clipped_reverse_kl
from eopd.objectives.reduction import Metrics
from eopd.objectives.teacher_stats import TeacherStats, teacher_token_stats
from eopd.schedules import Schedule, as_schedule, schedule_range


@dataclass
class _Tile:
    """The detached per-token data of one tile of valid positions, all (n, ...)."""

    tokens: Tensor
    old_logprobs: Tensor | None
    stats: TeacherStats
    teacher_logp: Tensor | None  # (n, V) teacher log-probs when the full teacher is available
    teacher_p: Tensor | None = None  # (n, V) their exp, on the closed-form path


# A term function maps the student's log-probs of a tile (n, V), differentiable, to per-token values (n,).
TermFn = Callable[[Tensor, _Tile, Mapping[str, Any]], Tensor]
# A sparse term depends on the student only through its log-probs at a few vocabulary ids per token:
# `support` gives those ids (n, m), `gathered` maps the log-probs there (n, m) to per-token values (n,).
SupportFn = Callable[[_Tile, Mapping[str, Any]], Tensor]
GatheredFn = Callable[[Tensor, _Tile, Mapping[str, Any]], Tensor]
# A dense term with a closed-form derivative: dense(logp, p, tile, options, need_grad, consume) ->
# (values (n,), G (n, V) or None), G = d values / d logp, a tensor the caller may overwrite. With consume,
# the function may build G in the memory of tile.teacher_logp / tile.teacher_p (set when the objective has
# the teacher's logits), which nothing reads afterwards.
DenseFn = Callable[[Tensor, Tensor, _Tile, Mapping[str, Any], bool, bool], tuple[Tensor, Tensor | None]]


@dataclass(frozen=True)
class TermKind:
    """What a kind of term computes, what it needs, and which options it takes (with defaults).

    `support` and `gathered` (optional, for terms that read the student's log-probs at a few ids only,
    when `sparse_if(options)` holds), or `dense` (a full-vocabulary term whose derivative with respect to
    the log-probs is known in closed form) let the objective skip autograd through the full-vocabulary
    softmax: the tile's gradient is then formed in closed form (see `Objective._closed_form_tile`).
    """

    fn: TermFn
    needs_teacher_logits: bool = False
    needs_old_logprobs: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)
    doc: str = ""
    support: SupportFn | None = None
    gathered: GatheredFn | None = None
    sparse_if: Callable[[Mapping[str, Any]], bool] = lambda options: True
    dense: DenseFn | None = None


def _ppo_support(tile: _Tile, opt: Mapping[str, Any]) -> Tensor:
    return tile.tokens[:, None]  # (n, 1)


def _ppo_gathered(at_tokens: Tensor, tile: _Tile, opt: Mapping[str, Any]) -> Tensor:
    return ppo_clipped_reverse_kl(
        at_tokens[:, 0],
        tile.old_logprobs,
        tile.stats.token_logprobs,
        eps_low=opt["eps_low"],
        eps_high=opt["eps_high"],
    ).loss


def _ppo(logp: Tensor, tile: _Tile, opt: Mapping[str, Any]) -> Tensor:
    return _ppo_gathered(logp.gather(-1, _ppo_support(tile, opt)), tile, opt)


def _topk_support(tile: _Tile, opt: Mapping[str, Any]) -> Tensor:
    return tile.stats.topk_indices[:, : opt["k"]]  # (n, k)


def _topk_gathered(at_topk: Tensor, tile: _Tile, opt: Mapping[str, Any]) -> Tensor:
    # The same tested function, on log-probs already gathered at the top-k: position j holds id j.
    k = opt["k"]
    local = torch.arange(k, device=at_topk.device).expand_as(at_topk)
    return D.topk_forward_kl_given_log_probs(at_topk, tile.stats.topk_logprobs[:, :k], local, tail="renorm")


def _topk_fkl(logp: Tensor, tile: _Tile, opt: Mapping[str, Any]) -> Tensor:
    k = opt["k"]
    return D.topk_forward_kl_given_log_probs(
        logp, tile.stats.topk_logprobs[:, :k], tile.stats.topk_indices[:, :k], tail=opt["tail"]
    )


def _full(divergence: Callable[..., Tensor]) -> TermFn:
    # Each term reuses the public, tested function on the log-probs the tile computed once.
    def term(logp: Tensor, tile: _Tile, opt: Mapping[str, Any]) -> Tensor:
        return divergence(logp, tile.teacher_logp, normalized=True, **opt)

    return term


def _entropy_bonus(logp: Tensor, tile: _Tile, opt: Mapping[str, Any]) -> Tensor:
    return (logp.exp() * logp).sum(-1)  # = -H(student): minimising it raises the student's entropy


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise sum of a * b over the vocabulary, with no (n, V) temporary: (n,)."""
    return torch.einsum("nv,nv->n", a, b)


# Closed-form derivatives G = d values / d logp, from the definitions (logp = log p, p = exp(logp)):
#   KL(t||s) = sum p_t (log p_t - log p)     -> G = -p_t
#   KL(s||t) = sum p (log p - log p_t)       -> G = p (log p - log p_t + 1)
#   -H(s)    = sum p log p                   -> G = p (log p + 1)
# The log-probs stay on the simplex, so G + c p gives the same gradient for any c per row; each function
# returns the representative with sum_v G_v = 0 (c = -sum_v G_v), which is also the gradient itself up to
# 1/T and avoids subtracting two large, nearly equal rows: p - p_t, p (log p - log p_t - KL), p (log p + H).
def _forward_kl_dense(logp, p, tile: _Tile, opt, need_grad: bool, consume: bool):
    values = _dot(tile.teacher_p, tile.teacher_logp) - _dot(tile.teacher_p, logp)
    if not need_grad:
        return values, None
    if consume:  # p - p_t in p_t's memory
        tile.teacher_logp = None
        grad, tile.teacher_p = tile.teacher_p.neg_().add_(p), None
        return values, grad
    return values, p - tile.teacher_p


def _reverse_kl_dense(logp, p, tile: _Tile, opt, need_grad: bool, consume: bool):
    values = _dot(p, logp) - _dot(p, tile.teacher_logp)
    if not need_grad:
        return values, None
    if consume:  # in log p_t's memory
        grad, tile.teacher_logp, tile.teacher_p = tile.teacher_logp.neg_().add_(logp), None, None
    else:
        grad = logp - tile.teacher_logp
    return values, grad.sub_(values[:, None]).mul_(p)


def _entropy_bonus_dense(logp, p, tile: _Tile, opt, need_grad: bool, consume: bool):
    values = _dot(p, logp)  # = -H
    return values, (logp - values[:, None]).mul_(p) if need_grad else None


TERM_KINDS: dict[str, TermKind] = {
    "ppo_rkl": TermKind(
        _ppo,
        needs_old_logprobs=True,
        options={"eps_low": 0.2, "eps_high": 0.2},
        doc="PPO-clipped sampled-token reverse KL, advantage log p_te(y) - log p_old(y) (the OPD term)",
        support=_ppo_support,
        gathered=_ppo_gathered,
    ),
    "topk_fkl": TermKind(
        _topk_fkl,
        options={"k": 16, "tail": "renorm"},
        doc="forward KL over the teacher's top-k, student log-probs from its full softmax",
        support=_topk_support,
        gathered=_topk_gathered,
        # The bucket tail reads the student's mass outside the top-k, i.e. the whole vocabulary.
        sparse_if=lambda options: options["tail"] == "renorm",
    ),
    "forward_kl": TermKind(
        _full(D.forward_kl),
        needs_teacher_logits=True,
        doc="full-vocabulary KL(teacher||student)",
        dense=_forward_kl_dense,
    ),
    "reverse_kl": TermKind(
        _full(D.reverse_kl),
        needs_teacher_logits=True,
        doc="full-vocabulary KL(student||teacher)",
        dense=_reverse_kl_dense,
    ),
    "generalized_jsd": TermKind(
        _full(D.generalized_jsd), needs_teacher_logits=True, options={"beta": 0.5}, doc="generalised JSD"
    ),
    "skew_forward_kl": TermKind(
        _full(D.skew_forward_kl), needs_teacher_logits=True, options={"alpha": 0.1}, doc="skew forward KL"
    ),
    "skew_reverse_kl": TermKind(
        _full(D.skew_reverse_kl), needs_teacher_logits=True, options={"alpha": 0.1}, doc="skew reverse KL"
    ),
    "total_variation": TermKind(_full(D.total_variation), needs_teacher_logits=True, doc="total variation"),
    "entropy_bonus": TermKind(
        _entropy_bonus, doc="minus the student's entropy (an entropy bonus)", dense=_entropy_bonus_dense
    ),
}


@dataclass(frozen=True)
class Term:
    """One summand of an objective: weight(step) x gate(teacher entropy) x divergence.

    Attributes:
        kind: a key of `TERM_KINDS` (e.g. "ppo_rkl", "topk_fkl", "forward_kl").
        weight: a non-negative number or schedule over optimizer steps (the paper's alpha for "topk_fkl").
        gate: which tokens the term acts on (`NoGate` = all).
        options: the kind's options (e.g. {"k": 16, "tail": "renorm"}); unknown keys are an error.
        name: the log name (`loss/<name>`); defaults to the kind.
    """

    kind: str
    weight: float | Schedule = 1.0
    gate: Gate = field(default_factory=NoGate)
    options: Mapping[str, Any] = field(default_factory=dict)
    name: str | None = None

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


def _check_options(kind: str, opt: Mapping[str, Any]) -> None:
    if kind == "ppo_rkl":
        check_clip_range(opt["eps_low"], opt["eps_high"])
    if kind == "topk_fkl":
        if not isinstance(opt["k"], int) or opt["k"] < 1:
            raise ValueError(f"top_k={opt['k']!r} must be a positive integer (the paper uses 16)")
        if opt["tail"] not in D.TAIL_MODES:
            raise ValueError(f"tail={opt['tail']!r} is not a tail mode; allowed: {', '.join(D.TAIL_MODES)}")
    for name in ("beta", "alpha"):
        if name in opt and not 0.0 <= opt[name] <= 1.0:
            raise ValueError(f"{name}={opt[name]!r} of term {kind!r} must lie in [0, 1]")


class ObjectiveOutput(NamedTuple):
    loss: Tensor
    """0-dim float32 loss: this call's share of the token mean over the whole batch."""
    metrics: Metrics
    """Detached diagnostics (weighted sums), mergeable across micro-batches; `.means()` gives floats."""


@dataclass(frozen=True)
class Objective:
    """A sum of `Term`s with one temperature, plus the diagnostics logged with every loss.

    Attributes:
        terms: the summands.
        temperature: the temperature both models are scored at; must equal the sampling temperature.
        top_k: how many teacher top-k statistics the objective (and its diagnostics) use.
        diagnostic_tau: the entropy threshold (nats) splitting tokens into high and low entropy in the
            diagnostics, the same for every objective so that variants stay comparable (paper: 0.8).
        chunk_size: token positions per tile of logits; bounds peak memory at about chunk_size x V floats.
        name: a label for logs.
    """

    terms: tuple[Term, ...]
    temperature: float = 1.0
    top_k: int = 16
    diagnostic_tau: float = 0.8
    chunk_size: int = 256
    name: str = "custom"

    def __post_init__(self) -> None:
        object.__setattr__(self, "terms", tuple(self.terms))
        if not self.terms:
            raise ValueError("an objective needs at least one term")
        D._check_temperature(self.temperature)
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"top_k={self.top_k!r} must be a positive integer (the paper uses 16)")
        for term in self.terms:
            if term.kind == "topk_fkl" and term.options["k"] > self.top_k:
                raise ValueError(
                    f"term {term.name!r} uses k={term.options['k']} but the objective keeps top_k={self.top_k} "
                    "teacher statistics; raise top_k"
                )
        if self.diagnostic_tau < 0:
            raise ValueError(f"diagnostic_tau={self.diagnostic_tau!r} must be >= 0 nats")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size={self.chunk_size!r} must be a positive number of token positions")
        names = [t.name for t in self.terms]
        if len(set(names)) != len(names):
            raise ValueError(f"term names {names} must be unique (set Term.name)")

    @property
    def needs_teacher_logits(self) -> bool:
        """True when a term needs the teacher's full distribution during the update (not just its stats)."""
        return any(t.spec.needs_teacher_logits for t in self.terms)

    @property
    def needs_old_logprobs(self) -> bool:
        return any(t.spec.needs_old_logprobs for t in self.terms)

    def gate_weights(self, teacher_entropy: Tensor, mask: Tensor, *, step: int = 0) -> Tensor:
        """Per-term gate weights (n_terms, ...) for a whole rollout batch, before it is split."""
        mask = mask.bool()
        return torch.stack([t.gate(teacher_entropy, mask, step=step) for t in self.terms])

    def __call__(
        self,
        *,
        student: LogitSource,
        tokens: Tensor,
        mask: Tensor,
        teacher_stats: TeacherStats | None = None,
        teacher: LogitSource | None = None,
        old_logprobs: Tensor | None = None,
        gate_weights: Tensor | None = None,
        step: int = 0,
        num_valid_tokens: int | Tensor | None = None,
        token_logprobs_out: Tensor | None = None,
    ) -> ObjectiveOutput:
        """Loss and diagnostics for a batch of response positions of shape (...), e.g. (B, T).

        Args:
            student: student logits (..., V) or `LinearLogits` (hidden (..., H) and output weight).
            tokens: (...) the sampled tokens y_t.
            mask: (...) True on valid response tokens.
            teacher_stats: the teacher's per-token statistics (...); computed from `teacher` when None.
            teacher: the teacher's logits (..., V) or `LinearLogits`; needed by full-vocabulary terms, and
                when given the diagnostics include the exact full-vocabulary forward and reverse KL.
            old_logprobs: (...) log pi_old(y_t) of the rollout policy, for "ppo_rkl". When None, the
                current student's own log-probs stand in (a single on-policy update: ratio 1, no clip).
            gate_weights: (n_terms, ...) from `gate_weights` over the whole rollout batch; computed on this
                call's batch when None (correct for a batch that is not split).
            step: the optimizer step, for schedules and random gates.
            num_valid_tokens: valid tokens of the whole batch across micro-batches and ranks; this call's
                count when None.
            token_logprobs_out: optional float32 tensor shaped like `tokens`; filled at the valid
                positions with the student's log pi(y_t) as scored here (detached), e.g. to keep them as
                the old policy's without a second pass over the vocabulary.

        Returns:
            ObjectiveOutput(loss, metrics).
        """
        mask = self._check_inputs(student, tokens, mask, teacher_stats, teacher, old_logprobs, gate_weights)
        if teacher_stats is None:
            if teacher is None:
                raise ValueError("pass teacher_stats or the teacher's logits (teacher=...)")
            teacher_stats = teacher_token_stats(
                teacher, tokens, k=self.top_k, temperature=self.temperature, chunk_size=self.chunk_size
            )
        elif teacher_stats.temperature != self.temperature:
            raise ValueError(
                f"teacher_stats were computed at temperature {teacher_stats.temperature} but the objective "
                f"scores at {self.temperature}; sampling and scoring temperatures must agree"
            )
        if teacher_stats.k < self.top_k:
            raise ValueError(
                f"teacher_stats keep k={teacher_stats.k} tokens but the objective needs {self.top_k}"
            )
        if gate_weights is None:
            gate_weights = self.gate_weights(teacher_stats.entropy, mask, step=step)

        flat_student = source_rows(student, mask)
        flat_teacher = None if teacher is None else source_rows(teacher, mask)
        stats = teacher_stats.rows(mask)
        flat_tokens = tokens[mask]
        flat_old = None if old_logprobs is None else old_logprobs[mask].float()
        gates = gate_weights[:, mask].float()  # (n_terms, N)
        n_local = int(flat_tokens.shape[0])
        count = float(n_local if num_valid_tokens is None else num_valid_tokens)
        count = max(count, 1.0)
        weights = [t.weight(step) for t in self.terms]
        coefficients = (
            torch.stack([w * g for w, g in zip(weights, gates, strict=True)]) / count
        )  # (n_terms, N)

        metrics = Metrics()
        self._teacher_metrics(metrics, stats, gates)
        flat_token_logp = None
        if token_logprobs_out is not None:
            if token_logprobs_out.shape != tokens.shape:
                raise ValueError(
                    f"token_logprobs_out shape {tuple(token_logprobs_out.shape)} != tokens shape "
                    f"{tuple(tokens.shape)}"
                )
            flat_token_logp = flat_tokens.new_zeros(flat_tokens.shape, dtype=torch.float32)

        def teacher_log_probs(start: int, end: int) -> Tensor:
            logits = source_tile(flat_teacher, start, end)
            return torch.log_softmax(logits if self.temperature == 1.0 else logits / self.temperature, -1)

        def tile_loss(student_logits: Tensor, start: int, end: int) -> Tensor:
            logp = torch.log_softmax(student_logits / self.temperature, dim=-1)  # (n, V)
            tile = _Tile(
                tokens=flat_tokens[start:end],
                old_logprobs=None,
                stats=stats.rows(slice(start, end)),
                teacher_logp=None,
            )
            token_logp = logp.gather(-1, tile.tokens[:, None]).squeeze(-1)
            if flat_token_logp is not None:
                flat_token_logp[start:end] = token_logp.detach()
            tile.old_logprobs = token_logp.detach() if flat_old is None else flat_old[start:end]
            if flat_teacher is not None:
                tile.teacher_logp = teacher_log_probs(start, end)
            total = logp.new_zeros(())
            for i, term in enumerate(self.terms):
                values = term.spec.fn(logp, tile, term.options)
                coefficient = coefficients[i, start:end]
                total = total + (coefficient * values).sum()
                metrics.add(f"loss/{term.name}", (coefficient * count) * values.detach())
            self._student_metrics(metrics, logp.detach(), token_logp.detach(), tile, gates[:, start:end])
            return total

        def closed_form_tile(student_logits: Tensor, start: int, end: int, need_grad: bool):
            tile = _Tile(
                tokens=flat_tokens[start:end],
                old_logprobs=None if flat_old is None else flat_old[start:end],
                stats=stats.rows(slice(start, end)),
                teacher_logp=None,
            )
            if flat_teacher is not None:
                tile.teacher_logp = teacher_log_probs(start, end)
                tile.teacher_p = tile.teacher_logp.exp()
            return self._closed_form_tile(
                student_logits,
                tile,
                coefficients[:, start:end],
                count,
                metrics,
                gates[:, start:end],
                need_grad,
                None if flat_token_logp is None else flat_token_logp[start:end],
            )

        if all(term.closed_form for term in self.terms):
            loss = tiled_loss(flat_student, closed_form_tile, chunk_size=self.chunk_size, analytic_grad=True)
        else:
            loss = tiled_loss(flat_student, tile_loss, chunk_size=self.chunk_size)
        metrics.add_sums("loss/total", loss.detach() * count, n_local)
        if token_logprobs_out is not None:
            token_logprobs_out[mask] = flat_token_logp.to(token_logprobs_out.dtype)
        return ObjectiveOutput(loss, metrics)

    def _closed_form_tile(
        self,
        logits: Tensor,
        tile: _Tile,
        coefficients: Tensor,
        count: float,
        metrics: Metrics,
        gates: Tensor,
        need_grad: bool,
        token_logp_out: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """One tile's loss and d loss / d logits in closed form, for objectives of closed-form terms only.

        With log p = log_softmax(z / T) and G = d L / d log p, the chain rule through the softmax gives
            d L / d z = (G - p * sum_v G_v) / T.
        Sparse terms contribute G on their supports only (the sampled token, the teacher's top-k), dense
        ones (`TermKind.dense`: full-vocabulary KL, entropy) a full row each; either way the full-vocabulary
        work is a log-softmax, an exp shared with the diagnostics and a few fused row operations: no
        autograd graph over (n, V) tensors.

        Args:
            logits: (n, V) float32 student logits of the tile; overwritten (with the log-probs).
            coefficients: (n_terms, n) weight x gate / N_valid per term and token.
            gates: (n_terms, n) gate weights, for the diagnostics.
        """
        # In place: at a 150k vocabulary each (n, V) float32 tensor is what bounds the chunk size.
        z = logits if self.temperature == 1.0 else logits.div_(self.temperature)
        logp = z.sub_(torch.logsumexp(z, dim=-1, keepdim=True))  # (n, V)
        p = logp.exp()
        student_entropy = -torch.einsum("nv,nv->n", p, logp)
        token_logp = logp.gather(-1, tile.tokens[:, None]).squeeze(-1)
        if token_logp_out is not None:
            token_logp_out.copy_(token_logp)
        if tile.old_logprobs is None:
            tile.old_logprobs = token_logp
        # Diagnostics first: the last dense term may build its gradient in the teacher's tensors.
        self._student_metrics(
            metrics, logp, token_logp, tile, gates, student_entropy=student_entropy, student_p=p
        )
        total = logp.new_zeros(())
        supports, grads = [], []
        with torch.enable_grad():
            for i, term in enumerate(self.terms):
                if not term.sparse:
                    continue
                support = term.spec.support(tile, term.options)  # (n, m)
                at = logp.gather(-1, support).requires_grad_(need_grad)
                values = term.spec.gathered(at, tile, term.options)
                term_total = (coefficients[i] * values).sum()
                metrics.add(f"loss/{term.name}", (coefficients[i] * count) * values.detach())
                total = total + term_total.detach()
                if need_grad:
                    (grad_at,) = torch.autograd.grad(term_total, at)
                    supports.append(support)
                    grads.append(grad_at)
        dense = [i for i, term in enumerate(self.terms) if not term.sparse]
        dense_grad = None  # (n, V): sum over dense terms of coefficient x G
        for i in dense:
            term = self.terms[i]
            consume = i == dense[-1]
            values, g = term.spec.dense(logp, p, tile, term.options, need_grad, consume)
            metrics.add(f"loss/{term.name}", (coefficients[i] * count) * values)
            total = total + (coefficients[i] * values).sum()
            if need_grad:
                g = g.mul_(coefficients[i][:, None])
                dense_grad = g if dense_grad is None else dense_grad.add_(g)
        if not need_grad:
            return total, None
        grad_sum = sum(g.sum(-1) for g in grads) if grads else logp.new_zeros(logp.shape[0])  # (n,)
        if dense_grad is not None:
            grad_sum = grad_sum + dense_grad.sum(-1)
        grad = p.mul_(-grad_sum[:, None])  # p is not needed any more: reuse its memory
        if dense_grad is not None:
            grad.add_(dense_grad)
        for support, grad_at in zip(supports, grads, strict=True):
            grad.scatter_add_(-1, support, grad_at)
        if self.temperature != 1.0:
            grad.div_(self.temperature)
        return total, grad

    # ---- diagnostics ------------------------------------------------------------------------------

    def _first_gate(self) -> int | None:
        for i, term in enumerate(self.terms):
            if not isinstance(term.gate, NoGate):
                return i
        return None

    def _teacher_metrics(self, metrics: Metrics, stats: TeacherStats, gates: Tensor) -> None:
        high = (stats.entropy >= self.diagnostic_tau).float()
        metrics.add("entropy/teacher", stats.entropy)
        metrics.add("entropy/teacher_high_frac", high)
        metrics.add("teacher/topk_mass", stats.topk_mass)
        first = self._first_gate()
        metrics.add("gate/fraction", gates[first] if first is not None else torch.zeros_like(stats.entropy))
        for i, term in enumerate(self.terms):
            if not isinstance(term.gate, NoGate):
                metrics.add(f"gate/{term.name}_fraction", gates[i])

    def _student_metrics(
        self,
        metrics: Metrics,
        logp: Tensor,
        token_logp: Tensor,
        tile: _Tile,
        gates: Tensor,
        student_entropy: Tensor | None = None,
        student_p: Tensor | None = None,
    ) -> None:
        stats = tile.stats
        high = (stats.entropy >= self.diagnostic_tau).float()
        if student_entropy is None:
            student_entropy = -(logp.exp() * logp).sum(-1)
        metrics.add("entropy/student", student_entropy)
        metrics.add("entropy/student_high_frac", (student_entropy >= self.diagnostic_tau).float())
        metrics.add("div/k1", token_logp - stats.token_logprobs)
        fkl_topk = D.topk_forward_kl_given_log_probs(
            logp, stats.topk_logprobs, stats.topk_indices, tail="renorm"
        )
        metrics.add("div/fkl_topk", fkl_topk)
        metrics.add("div/fkl_topk_high_entropy", fkl_topk, high)
        metrics.add("div/fkl_topk_low_entropy", fkl_topk, 1.0 - high)
        first = self._first_gate()
        if first is not None:
            metrics.add("div/fkl_topk_gated", fkl_topk, gates[first])
            metrics.add("div/fkl_topk_ungated", fkl_topk, 1.0 - gates[first])
        log_ratio = token_logp - tile.old_logprobs
        ratio = log_ratio.exp()
        metrics.add("ppo/approx_kl", torch.expm1(log_ratio) - log_ratio)  # k3 of KL(old || current)
        metrics.add("ppo/ratio", ratio)
        for term in self.terms:
            if term.kind == "ppo_rkl":
                lo, hi = 1.0 - term.options["eps_low"], 1.0 + term.options["eps_high"]
                advantage = stats.token_logprobs - tile.old_logprobs
                clipped = ((ratio > hi) & (advantage > 0)) | ((ratio < lo) & (advantage < 0))
                metrics.add("ppo/clip_fraction", clipped.float())
                break
        if tile.teacher_logp is not None:
            p_t = tile.teacher_p if tile.teacher_p is not None else tile.teacher_logp.exp()
            p_s = student_p if student_p is not None else logp.exp()
            fkl = _dot(p_t, tile.teacher_logp) - _dot(p_t, logp)
            rkl = _dot(p_s, logp) - _dot(p_s, tile.teacher_logp)
            metrics.add("div/fkl", fkl)
            metrics.add("div/rkl", rkl)
            metrics.add("div/fkl_high_entropy", fkl, high)
            metrics.add("div/fkl_low_entropy", fkl, 1.0 - high)
            metrics.add("div/rkl_high_entropy", rkl, high)
            if first is not None:
                metrics.add("div/fkl_gated", fkl, gates[first])
                metrics.add("div/fkl_ungated", fkl, 1.0 - gates[first])

    # ---- input checks -----------------------------------------------------------------------------

    def _check_inputs(
        self, student, tokens, mask, teacher_stats, teacher, old_logprobs, gate_weights
    ) -> Tensor:
        if mask.shape != tokens.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != tokens shape {tuple(tokens.shape)}")
        lead = tuple(student.shape[:-1])
        if lead != tuple(mask.shape):
            raise ValueError(
                f"student positions {lead} do not match mask shape {tuple(mask.shape)}: pass the student's "
                "logits (or hidden states) at the response positions only"
            )
        vocab = student.shape[-1]
        if teacher is not None:
            if tuple(teacher.shape[:-1]) != lead:
                raise ValueError(f"teacher positions {tuple(teacher.shape[:-1])} != student positions {lead}")
            if teacher.shape[-1] != vocab:
                raise ValueError(
                    f"student vocab size {vocab} != teacher vocab size {teacher.shape[-1]}: slice both to the "
                    "shared vocabulary (LinearLogits(vocab_size=...) or logits[..., :V])"
                )
        elif self.needs_teacher_logits:
            needing = [t.name for t in self.terms if t.spec.needs_teacher_logits]
            raise ValueError(
                f"terms {needing} need the teacher's full logits: pass teacher=... (logits or LinearLogits)"
            )
        if teacher_stats is not None and tuple(teacher_stats.entropy.shape) != tuple(mask.shape):
            raise ValueError(
                f"teacher_stats shape {tuple(teacher_stats.entropy.shape)} != mask shape {tuple(mask.shape)}"
            )
        if old_logprobs is not None and old_logprobs.shape != mask.shape:
            raise ValueError(
                f"old_logprobs shape {tuple(old_logprobs.shape)} != mask shape {tuple(mask.shape)}"
            )
        if gate_weights is not None and tuple(gate_weights.shape) != (len(self.terms), *mask.shape):
            raise ValueError(
                f"gate_weights shape {tuple(gate_weights.shape)} != (n_terms={len(self.terms)}, *mask.shape)"
            )
        if self.top_k > vocab:
            raise ValueError(f"top_k={self.top_k} exceeds the vocabulary size {vocab}; use top_k <= {vocab}")
        mask = mask.bool()
        for name, source in (("student", student), ("teacher", teacher)):
            if source is None:
                continue
            values = source.hidden if isinstance(source, LinearLogits) else source
            if not bool(torch.isfinite(values[mask]).all()):
                kind = "hidden states" if isinstance(source, LinearLogits) else "logits"
                raise ValueError(f"{name} {kind} contain NaN or inf at valid positions")
        if tokens[mask].numel() and (int(tokens[mask].max()) >= vocab or int(tokens[mask].min()) < 0):
            raise ValueError(f"sampled tokens must lie in [0, {vocab}); got max {int(tokens[mask].max())}")
        return mask


# ---- presets --------------------------------------------------------------------------------------


def preset(
    name: str,
    *,
    tau: float | Schedule = 0.8,
    alpha: float | Schedule = 1.0,
    top_k: int = 16,
    tail: str = "renorm",
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    q: float | Schedule = 0.2,
    width: float = 0.1,
    beta: float = 0.5,
    entropy_bonus: float | Schedule = 0.01,
    seed: int = 0,
    temperature: float = 1.0,
    diagnostic_tau: float = 0.8,
    chunk_size: int = 256,
) -> Objective:
    """A named objective. Paper defaults: tau 0.8 nats, alpha 1, top-k 16, eps 0.2.

    Names:
        opd: PPO-clipped sampled reverse KL on every token (the paper's OPD baseline).
        eopd: opd + alpha * 1[H_t >= tau] * top-k forward KL (the paper's method).
        eopd_quantile: the forward KL on the top fraction q of tokens by teacher entropy.
        eopd_soft: the forward KL weighted by sigmoid((H_t - tau) / width).
        eopd_random: the forward KL on as many random tokens as the hard gate would open.
        rkl_plus_fkl: opd + alpha * top-k forward KL on every token.
        opd_entropy_bonus: opd minus entropy_bonus x the student's entropy.
        rkl, fkl, jsd: full-vocabulary analytic reverse KL, forward KL, generalised JSD(beta).
        kd: fkl under its own name, for off-policy KD: the loss is the same, the responses come from the
            teacher (the training config `objective=kd` selects `rollout=teacher`).
    """
    if name not in PRESETS:
        raise ValueError(f"objective {name!r} is unknown; allowed: {', '.join(PRESETS)}")
    if isinstance(tau, int | float) and tau < 0:
        raise ValueError(f"tau={tau!r} must be >= 0 nats (the paper uses 0.8)")
    if isinstance(alpha, int | float) and alpha < 0:
        raise ValueError(f"alpha={alpha!r} must be >= 0 (the paper uses 1.0)")
    ppo = Term("ppo_rkl", options={"eps_low": eps_low, "eps_high": eps_high})

    def fkl(gate: Gate) -> Term:
        return Term("topk_fkl", weight=alpha, gate=gate, options={"k": top_k, "tail": tail})

    terms: tuple[Term, ...]
    if name == "opd":
        terms = (ppo,)
    elif name == "eopd":
        terms = (ppo, fkl(HardGate(tau)))
    elif name == "eopd_quantile":
        terms = (ppo, fkl(QuantileGate(q)))
    elif name == "eopd_soft":
        terms = (ppo, fkl(SoftGate(tau, width)))
    elif name == "eopd_random":
        terms = (ppo, fkl(RandomGate(HardGate(tau), seed=seed)))
    elif name == "rkl_plus_fkl":
        terms = (ppo, fkl(NoGate()))
    elif name == "opd_entropy_bonus":
        terms = (ppo, Term("entropy_bonus", weight=entropy_bonus))
    elif name == "rkl":
        terms = (Term("reverse_kl"),)
    elif name in ("fkl", "kd"):
        terms = (Term("forward_kl"),)
    else:  # jsd
        terms = (Term("generalized_jsd", options={"beta": beta}),)
    return Objective(
        terms,
        temperature=temperature,
        top_k=top_k,
        diagnostic_tau=diagnostic_tau,
        chunk_size=chunk_size,
        name=name,
    )


PRESETS = (
    "opd",
    "eopd",
    "eopd_quantile",
    "eopd_soft",
    "eopd_random",
    "rkl_plus_fkl",
    "opd_entropy_bonus",
    "rkl",
    "fkl",
    "jsd",
    "kd",
)
