"""PPO-clipped, sampled-token policy gradients: the paper's reverse-KL term (the OPD baseline) and the same
surrogate on a task reward's advantage (GRPO)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class PPOTerm(NamedTuple):
    """Per-token outputs of `ppo_clipped_reverse_kl`, each of shape (...)."""

    loss: Tensor
    """max(-r A, -clip(r, 1 - eps_low, 1 + eps_high) A), capped at -c A where A < 0 with a dual clip c;
    differentiable through r."""
    clipped: Tensor
    """1.0 where a clipped branch is strictly chosen (so the token has no gradient), else 0.0."""
    ratio: Tensor
    """r = pi_theta(y) / pi_old(y), detached."""


def ppo_clipped_reverse_kl(
    student_logprobs: Tensor,
    old_logprobs: Tensor,
    teacher_logprobs: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    reward_floor: float | None = None,
    dual_clip: float | None = None,
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
        reward_floor: when set, A_t = max(A_t, reward_floor): REOPOLD's reward clipping (2603.11137,
            Eq. 5), whose floor is log(lambda) / (1 - lambda) for a teacher/student mixture weight lambda.
        dual_clip: see `ppo_clipped_surrogate`.

    Returns:
        PPOTerm of per-token loss, clip indicator and ratio.
    """
    advantage = teacher_logprobs.float() - old_logprobs.float()
    if reward_floor is not None:
        advantage = advantage.clamp(min=reward_floor)
    return ppo_clipped_surrogate(
        student_logprobs, old_logprobs, advantage, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip
    )


def ppo_clipped_surrogate(
    student_logprobs: Tensor,
    old_logprobs: Tensor,
    advantage: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
) -> PPOTerm:
    """The PPO-clipped surrogate for any per-token advantage A_t (detached here):

    L_t = max(-r_t A_t, -clip(r_t, 1 - eps_low, 1 + eps_high) A_t),  r_t = pi_theta(y_t) / pi_old(y_t).

    With A_t = log pi_te(y_t) - log pi_old(y_t) it is `ppo_clipped_reverse_kl`; with a sequence's
    group-normalised reward broadcast over its tokens it is GRPO's token-level loss.

    `dual_clip` c > 1 (dual-clip PPO, verl's `clip_ratio_c`, 3 there) also caps the loss of tokens with
    A_t < 0 at -c A_t: min(L_t, -c A_t). Without it a token the student has made far likelier than at the
    rollout (r_t > c) and that the teacher disfavours has an unbounded loss. None (the paper's PPO term):
    no cap.
    """
    check_clip_range(eps_low, eps_high)
    check_dual_clip(dual_clip)
    logp = student_logprobs.float()
    old = old_logprobs.float().detach()
    advantage = advantage.float().detach()
    ratio = torch.exp(logp - old)
    unclipped = -ratio * advantage
    clipped = -ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * advantage
    loss = torch.maximum(unclipped, clipped)
    no_gradient = clipped > unclipped
    if dual_clip is not None:
        cap = -dual_clip * advantage
        capped = (advantage < 0) & (cap < loss)
        loss = torch.where(capped, cap, loss)
        no_gradient = no_gradient | capped
    return PPOTerm(loss=loss, clipped=no_gradient.float().detach(), ratio=ratio.detach())


def check_dual_clip(dual_clip: float | None) -> None:
    """Raise a ValueError naming the argument when a dual clip is set and not above 1."""
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(
            f"dual_clip={dual_clip!r} must be > 1 (the cap -c A must lie above the clipped branch; verl uses 3), "
            "or null for none"
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


def group_advantages(rewards: Tensor, group_size: int, *, eps: float = 1e-6) -> Tensor:
    """GRPO's advantage: each reward minus its group's mean, over the group's standard deviation.

    A_i = (r_i - mean_g(r)) / (std_g(r) + eps), groups of `group_size` adjacent entries, std with Bessel's
    correction (as verl computes it). A group whose rewards are all equal gets 0 everywhere: no signal.

    Args:
        rewards: (B,) one reward per response, B a multiple of group_size >= 2.
    """
    if group_size < 2:
        raise ValueError(f"group_size={group_size} must be >= 2: a group baseline needs several samples")
    if rewards.ndim != 1 or rewards.shape[0] % group_size:
        raise ValueError(f"rewards shape {tuple(rewards.shape)} is not a multiple of group_size={group_size}")
    groups = rewards.float().reshape(-1, group_size)
    centred = groups - groups.mean(-1, keepdim=True)
    return (centred / (groups.std(-1, keepdim=True) + eps)).reshape(-1)
