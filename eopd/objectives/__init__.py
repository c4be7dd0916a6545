"""The objective library: divergences, gates, the PPO term, teacher statistics and composed objectives.

Pure torch: nothing here imports Lightning or Hydra.
"""

from eopd.objectives.divergences import (
    forward_kl,
    generalized_jsd,
    log_probs,
    reverse_kl,
    sampled_kl,
    sampled_kl_from_logits,
    skew_forward_kl,
    skew_reverse_kl,
    token_entropy,
    topk_forward_kl,
    topk_forward_kl_from_teacher,
    total_variation,
)
from eopd.objectives.fused import LinearLogits, per_token_fused, tiled_loss
from eopd.objectives.gates import (
    PAPER_TAU,
    SIGNALS,
    AllOf,
    AnyOf,
    Gate,
    HardGate,
    NoGate,
    Not,
    QuantileGate,
    RandomGate,
    Signals,
    SoftGate,
)
from eopd.objectives.objective import Objective, ObjectiveOutput, RolloutScores
from eopd.objectives.policy_gradient import PPOTerm, ppo_clipped_reverse_kl
from eopd.objectives.presets import PRESETS, preset
from eopd.objectives.reduction import Metrics, masked_mean, token_mean
from eopd.objectives.teacher_stats import TeacherStats, teacher_token_stats
from eopd.objectives.terms import DIVERGENCES, TERM_KINDS, Term

__all__ = [
    "DIVERGENCES",
    "PRESETS",
    "SIGNALS",
    "AllOf",
    "AnyOf",
    "Not",
    "RolloutScores",
    "Signals",
    "TERM_KINDS",
    "Gate",
    "HardGate",
    "LinearLogits",
    "Metrics",
    "NoGate",
    "PAPER_TAU",
    "Objective",
    "ObjectiveOutput",
    "PPOTerm",
    "QuantileGate",
    "RandomGate",
    "SoftGate",
    "TeacherStats",
    "Term",
    "forward_kl",
    "generalized_jsd",
    "log_probs",
    "masked_mean",
    "per_token_fused",
    "ppo_clipped_reverse_kl",
    "preset",
    "reverse_kl",
    "sampled_kl",
    "sampled_kl_from_logits",
    "skew_forward_kl",
    "skew_reverse_kl",
    "teacher_token_stats",
    "tiled_loss",
    "token_entropy",
    "token_mean",
    "topk_forward_kl",
    "topk_forward_kl_from_teacher",
    "total_variation",
]
