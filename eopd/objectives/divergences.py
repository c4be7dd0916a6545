"""Per-token divergences between a student and a teacher, as pure functions of logits.

Every function takes student logits first and teacher logits second, shape (..., V), divides both by
`temperature`, computes in float32 whatever the input dtype, and returns one value per position, shape
(...), in nats. `normalized=True` says the inputs are already log-probabilities at that temperature (the
composed objective passes the log-softmax it computed once per tile), so no second log-softmax is taken. Reductions over tokens live in `eopd.objectives.reduction`.

Conventions (PAPER.md section 7): p_s is the student distribution, p_t the teacher's;
forward KL = KL(p_t || p_s) (mode covering), reverse KL = KL(p_s || p_t) (mode seeking).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

TAIL_MODES = ("renorm", "bucket")
ESTIMATORS = ("k1", "k2", "k3")
# Finite stand-in for log 0: keeps logsumexp and its gradient finite when every token is excluded.
_EXCLUDED = -1e30


def log_probs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Float32 log-softmax of `logits / temperature` over the last dimension. (..., V) -> (..., V)."""
    _check_temperature(temperature)
    logits = logits.float()
    return torch.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)


def token_entropy(logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Entropy H = -sum_v p(v) log p(v) of softmax(logits / temperature). (..., V) -> (...)."""
    logp = log_probs(logits, temperature)
    return -(logp.exp() * logp).sum(-1)


def forward_kl(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, normalized: bool = False
) -> Tensor:
    """KL(p_t || p_s) = sum_v p_t(v) (log p_t(v) - log p_s(v)). (..., V), (..., V) -> (...)."""
    logp_s, logp_t = _pair_log_probs(student_logits, teacher_logits, temperature, normalized)
    return (logp_t.exp() * (logp_t - logp_s)).sum(-1)


def reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, normalized: bool = False
) -> Tensor:
    """KL(p_s || p_t) = sum_v p_s(v) (log p_s(v) - log p_t(v)). (..., V), (..., V) -> (...)."""
    logp_s, logp_t = _pair_log_probs(student_logits, teacher_logits, temperature, normalized)
    return (logp_s.exp() * (logp_s - logp_t)).sum(-1)


def generalized_jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    normalized: bool = False,
) -> Tensor:
    """Generalised Jensen-Shannon divergence with mixture weight `beta`.

    M = (1 - beta) p_s + beta p_t and JSD_beta = beta KL(p_t || M) + (1 - beta) KL(p_s || M), the
    convention shared by GKD and TRL. beta = 0.5 is the symmetric JSD (at most ln 2).

    Endpoints: this function is the formula itself, so at beta = 0 (M = p_s) and at beta = 1 (M = p_t)
    both weighted terms vanish and it returns exactly 0, the limit of its values. Some frameworks instead
    switch to forward KL at beta = 0 and reverse KL at beta = 1; here those are `forward_kl` and
    `reverse_kl` (near the endpoints, JSD_beta / beta -> forward KL and JSD_beta / (1 - beta) -> reverse KL).

    Shapes: (..., V), (..., V) -> (...).
    """
    _check_unit_interval("beta", beta)
    logp_s, logp_t = _pair_log_probs(student_logits, teacher_logits, temperature, normalized)
    if beta == 0.0 or beta == 1.0:
        # Exactly zero, but still attached to the graph so that backward() gives zero gradients.
        return 0.0 * logp_s.exp().sum(-1)
    log_m = _log_mixture(logp_t, logp_s, beta)
    kl_t_m = (logp_t.exp() * (logp_t - log_m)).sum(-1)
    kl_s_m = (logp_s.exp() * (logp_s - log_m)).sum(-1)
    return beta * kl_t_m + (1.0 - beta) * kl_s_m


def skew_forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    normalized: bool = False,
) -> Tensor:
    """Skew forward KL: KL(p_t || alpha p_t + (1 - alpha) p_s); alpha = 0 is `forward_kl`, alpha = 1 gives 0.

    Shapes: (..., V), (..., V) -> (...).
    """
    _check_unit_interval("alpha", alpha)
    logp_s, logp_t = _pair_log_probs(student_logits, teacher_logits, temperature, normalized)
    log_mix = _log_mixture(logp_t, logp_s, alpha)
    return (logp_t.exp() * (logp_t - log_mix)).sum(-1)


def skew_reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    normalized: bool = False,
) -> Tensor:
    """Skew reverse KL: KL(p_s || alpha p_s + (1 - alpha) p_t); alpha = 0 is `reverse_kl`, alpha = 1 gives 0.

    Shapes: (..., V), (..., V) -> (...).
    """
    _check_unit_interval("alpha", alpha)
    logp_s, logp_t = _pair_log_probs(student_logits, teacher_logits, temperature, normalized)
    log_mix = _log_mixture(logp_s, logp_t, alpha)
    return (logp_s.exp() * (logp_s - log_mix)).sum(-1)


def total_variation(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, normalized: bool = False
) -> Tensor:
    """Total variation distance 0.5 * sum_v |p_s(v) - p_t(v)|, in [0, 1]. (..., V), (..., V) -> (...)."""
    logp_s, logp_t = _pair_log_probs(student_logits, teacher_logits, temperature, normalized)
    return 0.5 * (logp_s.exp() - logp_t.exp()).abs().sum(-1)


def topk_forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    k: int = 16,
    tail: str = "renorm",
    temperature: float = 1.0,
) -> Tensor:
    """Forward KL over the teacher's top-k tokens (PAPER.md section 2, step 3).

    S = the k largest teacher logits. The student's log-probs come from its full-vocabulary softmax,
    gathered at S and never renormalised.
      - tail="renorm" (the paper): q = softmax of the teacher logits restricted to S and
        L = sum_{v in S} q(v) (log q(v) - log p_s(v)). L >= 0, and with k = V it is `forward_kl`.
      - tail="bucket": the teacher's and the student's remaining mass outside S go into one extra bin,
        L = sum_{v in S} p_t(v) log(p_t(v) / p_s(v)) + p_t(tail) log(p_t(tail) / p_s(tail)), a true KL
        between two (k+1)-bin distributions.

    Shapes: (..., V), (..., V) -> (...).
    """
    check_top_k(k, teacher_logits.shape[-1])
    check_same_vocab(student_logits, teacher_logits)
    logp_t_full = log_probs(teacher_logits, temperature)
    teacher_topk_logp, indices = logp_t_full.topk(k, dim=-1)
    # With the full teacher at hand, its tail mass comes exactly from the tokens outside S.
    teacher_log_tail = _log_mass_outside(logp_t_full, indices) if tail == "bucket" else None
    return topk_forward_kl_given_log_probs(
        log_probs(student_logits, temperature),
        teacher_topk_logp,
        indices,
        tail=tail,
        teacher_log_tail=teacher_log_tail,
    )


def topk_forward_kl_from_teacher(
    student_logits: Tensor,
    teacher_topk_logprobs: Tensor,
    teacher_topk_indices: Tensor,
    *,
    tail: str = "renorm",
    temperature: float = 1.0,
) -> Tensor:
    """`topk_forward_kl` when only the teacher's top-k statistics are kept (see `TeacherStats`).

    Args:
        student_logits: (..., V).
        teacher_topk_logprobs: (..., k) full-vocabulary teacher log-probs at its top-k tokens.
        teacher_topk_indices: (..., k) the token ids of those tokens.
        tail: "renorm" or "bucket", as in `topk_forward_kl`.
        temperature: the temperature both distributions are taken at.

    Returns:
        (...) per-position loss in nats.
    """
    logp_s = log_probs(student_logits, temperature)
    return topk_forward_kl_given_log_probs(logp_s, teacher_topk_logprobs, teacher_topk_indices, tail=tail)


def topk_forward_kl_given_log_probs(
    student_logprobs: Tensor,
    teacher_topk_logprobs: Tensor,
    teacher_topk_indices: Tensor,
    *,
    tail: str = "renorm",
    teacher_log_tail: Tensor | None = None,
) -> Tensor:
    """`topk_forward_kl_from_teacher` on the student's full-vocabulary log-probs (..., V) instead of logits.

    `teacher_log_tail` (...) is log of the teacher's mass outside S for tail="bucket"; when None it is
    log(1 - sum of the top-k probabilities), accurate to float32 rounding of that sum.
    """
    if tail not in TAIL_MODES:
        raise ValueError(f"tail={tail!r} is not a tail mode; allowed: {', '.join(TAIL_MODES)}")
    logp_s = student_logprobs.gather(-1, teacher_topk_indices)  # (..., k)
    logp_t = teacher_topk_logprobs.float()
    if tail == "renorm":
        log_q = torch.log_softmax(logp_t, dim=-1)
        return (log_q.exp() * (log_q - logp_s)).sum(-1)
    inside = (logp_t.exp() * (logp_t - logp_s)).sum(-1)
    if teacher_topk_indices.shape[-1] == student_logprobs.shape[-1]:
        return inside  # S is the whole vocabulary: the tail bin is empty on both sides
    if teacher_log_tail is None:
        teacher_log_tail = _log_one_minus_exp(torch.logsumexp(logp_t, dim=-1))
    # The student's tail mass from the log-probs outside S, not from 1 - sum: exact when S holds almost all.
    log_tail_s = _log_mass_outside(student_logprobs, teacher_topk_indices)
    tail_t = teacher_log_tail.exp()
    tail_term = torch.where(tail_t > 0, tail_t * (teacher_log_tail - log_tail_s), torch.zeros_like(tail_t))
    return inside + tail_term


def _log_mass_outside(logp: Tensor, indices: Tensor) -> Tensor:
    """log of the probability mass of the tokens not in `indices`. (..., V), (..., k) -> (...)."""
    return torch.logsumexp(logp.scatter(-1, indices, _EXCLUDED), dim=-1)


def sampled_kl(student_logprobs: Tensor, teacher_logprobs: Tensor, *, estimator: str = "k1") -> Tensor:
    """Sampled-token estimators of KL(p_s || p_t) at tokens y drawn from the student.

    With k1 = log p_s(y) - log p_t(y): k1 (unbiased, can be negative), k2 = k1^2 / 2 (biased, >= 0),
    k3 = exp(-k1) + k1 - 1 (unbiased, >= 0). Inputs are log-probs of the sampled tokens, shape (...).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r} is not a KL estimator; allowed: {', '.join(ESTIMATORS)}")
    k1 = student_logprobs.float() - teacher_logprobs.float()
    if estimator == "k1":
        return k1
    if estimator == "k2":
        return 0.5 * k1.square()
    return torch.expm1(-k1) + k1


def sampled_kl_from_logits(
    student_logits: Tensor,
    teacher_logits: Tensor,
    tokens: Tensor,
    *,
    estimator: str = "k1",
    temperature: float = 1.0,
) -> Tensor:
    """`sampled_kl` at the sampled `tokens` (...) given both models' logits (..., V). Returns (...)."""
    logp_s, logp_t = _pair_log_probs(student_logits, teacher_logits, temperature)
    index = tokens.unsqueeze(-1)
    return sampled_kl(
        logp_s.gather(-1, index).squeeze(-1), logp_t.gather(-1, index).squeeze(-1), estimator=estimator
    )


# ---- checks and small helpers -------------------------------------------------------------------


def _pair_log_probs(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float, normalized: bool = False
) -> tuple[Tensor, Tensor]:
    check_same_vocab(student_logits, teacher_logits)
    if normalized:  # already log-probs at this temperature: a second log-softmax would change nothing
        return student_logits.float(), teacher_logits.float()
    return log_probs(student_logits, temperature), log_probs(teacher_logits, temperature)


def check_same_vocab(student_logits: Tensor, teacher_logits: Tensor) -> None:
    """Raise when the two logit tensors disagree in vocabulary size or leading shape."""
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"student vocab size {student_logits.shape[-1]} != teacher vocab size {teacher_logits.shape[-1]}: "
            "slice both to the shared vocabulary first (eopd.models.check_shared_vocabulary gives its size; "
            "rows past it are padded embeddings)"
        )
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"student logits shape {tuple(student_logits.shape)} and teacher logits shape "
            f"{tuple(teacher_logits.shape)} must agree on every dimension but the last"
        )


def _log_mixture(logp_a: Tensor, logp_b: Tensor, weight_a: float) -> Tensor:
    """log(weight_a * p_a + (1 - weight_a) * p_b), computed stably in log space."""
    if weight_a == 0.0:
        return logp_b
    if weight_a == 1.0:
        return logp_a
    return torch.logaddexp(logp_a + math.log(weight_a), logp_b + math.log1p(-weight_a))


def _log_one_minus_exp(log_x: Tensor) -> Tensor:
    """log(1 - exp(log_x)) for log_x <= 0, accurate on both sides of log 2; -inf where x = 1."""
    log_x = log_x.clamp(max=0.0)
    return torch.where(log_x > -0.6931, torch.log(-torch.expm1(log_x)), torch.log1p(-torch.exp(log_x)))


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0 (1.0 scores at the sampling distribution)")


def _check_unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value!r} must lie in [0, 1]")


def check_top_k(k: int, vocab_size: int | None = None) -> None:
    """The one check of a top-k: a positive integer, at most the vocabulary size when that is known."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"top_k={k!r} must be a positive integer (the paper uses 16)")
    if vocab_size is not None and k > vocab_size:
        raise ValueError(f"top_k={k} exceeds the vocabulary size {vocab_size}; use top_k <= {vocab_size}")
