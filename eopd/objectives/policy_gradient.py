"""The paper's reverse-KL term: a PPO-clipped, sampled-token policy gradient (the OPD baseline)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class PPOTerm(NamedTuple):
    """Per-token outputs of `ppo_clipped_reverse_kl`, each of shape (...)."""

    loss: Tensor
    """max(-r A, -clip(r, 1 - eps_low, 1 + eps_high) A); differentiable through r."""
    clipped: Tensor
    """1.0 where the clipped branch is strictly larger (so the token has no gradient), else 0.0."""
    ratio: Tensor
    """r = pi_theta(y) / pi_old(y), detached."""


def ppo_clipped_reverse_kl(
    student_logprobs: Tensor,
    old_logprobs: Tensor,
    teacher_logprobs: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
) -> PPOTerm:
    """Sampled-token reverse KL as a PPO-clipped policy gradient (PAPER.md section 2, step 1).

    r_t = exp(log pi_theta(y_t) - log pi_old(y_t)),
    A_t = log pi_te(y_t) - log pi_old(y_t)  (detached: no baseline, no whitening),
    L_t = max(-r_t A_t, -clip(r_t, 1 - eps_low, 1 + eps_high) A_t).

    At r = 1 the gradient is -A_t * grad log pi_theta(y_t): the policy gradient of -KL(pi_theta || pi_te)
    with the per-token reward log pi_te - log pi_theta. pi_old must be the trainer's recomputed log-probs
    of the rollout policy, so that with several mini-batch updates per rollout the clip really acts.

    Args:
        student_logprobs: (...) log pi_theta(y_t) under the current student, differentiable.
        old_logprobs: (...) log pi_old(y_t), the student before this rollout batch's updates.
        teacher_logprobs: (...) log pi_te(y_t), at the same temperature.
        eps_low: lower clip range (r >= 1 - eps_low), > 0.
        eps_high: upper clip range (r <= 1 + eps_high), > 0.

    Returns:
        PPOTerm of per-token loss, clip indicator and ratio.
    """
    check_clip_range(eps_low, eps_high)
    logp = student_logprobs.float()
    old = old_logprobs.float().detach()
    advantage = (teacher_logprobs.float() - old).detach()
    ratio = torch.exp(logp - old)
    unclipped = -ratio * advantage
    clipped = -ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * advantage
    return PPOTerm(
        loss=torch.maximum(unclipped, clipped),
        clipped=(clipped > unclipped).float().detach(),
        ratio=ratio.detach(),
    )


def check_clip_range(eps_low: float, eps_high: float) -> None:
    """Raise a ValueError naming the argument when a clip range is not positive (or eps_low >= 1)."""
    if not eps_low > 0:
        raise ValueError(f"eps_low={eps_low!r} must be > 0 (verl and the paper use 0.2)")
    if not eps_low < 1:
        raise ValueError(
            f"eps_low={eps_low!r} must be < 1, or the lower clip bound 1 - eps_low is not positive"
        )
    if not eps_high > 0:
        raise ValueError(f"eps_high={eps_high!r} must be > 0 (verl and the paper use 0.2)")
