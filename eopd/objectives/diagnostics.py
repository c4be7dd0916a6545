"""The diagnostics logged with every loss, whatever the objective trains: divergences, entropies, gates, PPO.

Detached, as weighted sums in a `Metrics`; the same keys for every objective so that variants compare.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from eopd.objectives import divergences as D
from eopd.objectives.fused import exp_floored, row_dot
from eopd.objectives.gates import NoGate
from eopd.objectives.reduction import Metrics
from eopd.objectives.teacher_stats import TeacherStats
from eopd.objectives.terms import Term, Tile


def first_gate(terms: Sequence[Term]) -> int | None:
    """The index of the first gated term: its gate defines `gate/fraction` and the gated diagnostics."""
    for i, term in enumerate(terms):
        if not isinstance(term.gate, NoGate):
            return i
    return None


def teacher_metrics(metrics: Metrics, stats: TeacherStats, diagnostic_tau: float) -> None:
    """The teacher's side: its entropy, the high-entropy fraction and its top-k mass."""
    high = (stats.entropy >= diagnostic_tau).float()
    metrics.add("entropy/teacher", stats.entropy)
    metrics.add("entropy/teacher_high_frac", high)
    metrics.add("teacher/topk_mass", stats.topk_mass)


def gate_metrics(
    metrics: Metrics, gates: Tensor, per_token: dict[str, Tensor], terms: Sequence[Term]
) -> None:
    """The gates' side, once the gates are known: the fraction each opens, and the forward KL on the tokens
    the first gate opens and leaves closed.

    Args:
        gates: (n_terms, N) gate weights of the N valid tokens.
        per_token: the (N,) values `student_metrics` returned, concatenated over tiles.
    """
    first = first_gate(terms)
    metrics.add("gate/fraction", gates[first] if first is not None else torch.zeros_like(gates[0]))
    for i, term in enumerate(terms):
        if not isinstance(term.gate, NoGate):
            metrics.add(f"gate/{term.name}_fraction", gates[i])
    if first is None:
        return
    for name in ("fkl_topk", "fkl"):
        if name in per_token:
            metrics.add(f"div/{name}_gated", per_token[name], gates[first])
            metrics.add(f"div/{name}_ungated", per_token[name], 1.0 - gates[first])


def student_metrics(
    metrics: Metrics,
    logp: Tensor | None,
    token_logp: Tensor,
    tile: Tile,
    student_entropy: Tensor | None = None,
    topk_logp: Tensor | None = None,
    kls: tuple[Tensor, Tensor] | None = None,
    *,
    terms: Sequence[Term],
    diagnostic_tau: float,
) -> dict[str, Tensor]:
    """The student's side on one tile: entropy, divergences to the teacher (split by the teacher's entropy
    at `diagnostic_tau`), PPO ratio statistics; exact full-vocabulary KLs with the teacher's distribution.

    The caller may hand over what it computed already: `student_entropy` (n,), `topk_logp` (n, k) the
    log-probs at the teacher's top-k ids, and `kls`, the exact (KL(teacher || student), KL(student ||
    teacher)) per token (`tile_softmax.exact_kls`); otherwise they come from the full log-probs `logp`
    and the tile's `teacher_logp`. With all three given, `logp` is not read and may be None.

    Returns the per-token values (n,) the gates and `gate_metrics` read: "student_entropy", "log_ratio"
    (log pi_s(y) - log pi_t(y)), "fkl_topk", and "fkl", "rkl" with the teacher's distribution.
    """
    stats = tile.stats
    high = (stats.entropy >= diagnostic_tau).float()
    p_s = None  # the student's probabilities, formed from logp once where a sum reads them
    if student_entropy is None:
        p_s = exp_floored(logp)
        student_entropy = -row_dot(p_s, logp)
    metrics.add("entropy/student", student_entropy)
    metrics.add("entropy/student_high_frac", (student_entropy >= diagnostic_tau).float())
    log_ratio = token_logp - stats.token_logprobs
    metrics.add("div/k1", log_ratio)
    if topk_logp is None:
        topk_logp = logp.gather(-1, stats.topk_indices)
    local = torch.arange(stats.k, device=topk_logp.device).expand_as(topk_logp)  # position j holds id j
    fkl_topk = D.topk_forward_kl_given_log_probs(topk_logp, stats.topk_logprobs, local, tail="renorm")
    metrics.add("div/fkl_topk", fkl_topk)
    metrics.add("div/fkl_topk_high_entropy", fkl_topk, high)
    metrics.add("div/fkl_topk_low_entropy", fkl_topk, 1.0 - high)
    per_token = {"student_entropy": student_entropy, "log_ratio": log_ratio, "fkl_topk": fkl_topk}
    policy_change = token_logp - tile.old_logprobs
    ratio = policy_change.exp()
    metrics.add("ppo/approx_kl", torch.expm1(policy_change) - policy_change)  # k3 of KL(old || current)
    metrics.add("ppo/ratio", ratio)
    for term in terms:
        if term.kind == "ppo_rkl":
            lo, hi = 1.0 - term.options["eps_low"], 1.0 + term.options["eps_high"]
            advantage = stats.token_logprobs - tile.old_logprobs
            clipped = ((ratio > hi) & (advantage > 0)) | ((ratio < lo) & (advantage < 0))
            metrics.add("ppo/clip_fraction", clipped.float())
            break
    if kls is None and tile.teacher_logp is not None:
        p_t = tile.teacher_p if tile.teacher_p is not None else exp_floored(tile.teacher_logp)
        fkl = row_dot(p_t, tile.teacher_logp) - row_dot(p_t, logp)
        p_s = exp_floored(logp) if p_s is None else p_s
        kls = fkl, -student_entropy - row_dot(p_s, tile.teacher_logp)  # sum p_s log p_s = -student_entropy
    if kls is not None:
        fkl, rkl = kls
        metrics.add("div/fkl", fkl)
        metrics.add("div/rkl", rkl)
        metrics.add("div/fkl_high_entropy", fkl, high)
        metrics.add("div/fkl_low_entropy", fkl, 1.0 - high)
        metrics.add("div/rkl_high_entropy", rkl, high)
        per_token.update(fkl=fkl, rkl=rkl)
    return per_token
