"""The named objectives: the paper's OPD and EOPD, their gate variants, and the baselines it compares with.

`preset(name, **knobs)` builds one; `PRESETS` lists the names. Each preset is one line of `_RECIPES`, a
tuple of `Term`s built from the shared knobs, so a new variant is one more line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from eopd.objectives.gates import PAPER_TAU, Gate, HardGate, NoGate, QuantileGate, RandomGate, SoftGate
from eopd.objectives.objective import Objective
from eopd.objectives.terms import Term
from eopd.schedules import Schedule


@dataclass(frozen=True)
class _Knobs:
    """The preset's arguments, with the two terms every sampled-token preset builds from them."""

    tau: float | Schedule
    alpha: float | Schedule
    top_k: int
    tail: str
    eps_low: float
    eps_high: float
    q: float | Schedule
    width: float
    beta: float
    entropy_bonus: float | Schedule
    seed: int

    @property
    def ppo(self) -> Term:
        return Term("ppo_rkl", options={"eps_low": self.eps_low, "eps_high": self.eps_high})

    def fkl(self, gate: Gate) -> Term:
        return Term("topk_fkl", weight=self.alpha, gate=gate, options={"k": self.top_k, "tail": self.tail})


_RECIPES: dict[str, Callable[[_Knobs], tuple[Term, ...]]] = {
    "opd": lambda k: (k.ppo,),
    "eopd": lambda k: (k.ppo, k.fkl(HardGate(k.tau))),
    "eopd_quantile": lambda k: (k.ppo, k.fkl(QuantileGate(k.q))),
    "eopd_soft": lambda k: (k.ppo, k.fkl(SoftGate(k.tau, k.width))),
    "eopd_random": lambda k: (k.ppo, k.fkl(RandomGate(HardGate(k.tau), seed=k.seed))),
    "rkl_plus_fkl": lambda k: (k.ppo, k.fkl(NoGate())),
    "opd_entropy_bonus": lambda k: (k.ppo, Term("entropy_bonus", weight=k.entropy_bonus)),
    "rkl": lambda k: (Term("reverse_kl"),),
    "fkl": lambda k: (Term("forward_kl"),),
    "jsd": lambda k: (Term("generalized_jsd", options={"beta": k.beta}),),
    "kd": lambda k: (Term("forward_kl"),),
}

PRESETS = tuple(_RECIPES)


def preset(
    name: str,
    *,
    tau: float | Schedule = PAPER_TAU,
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
    diagnostic_tau: float = PAPER_TAU,
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

    `diagnostic_tau`, the high/low-entropy split of the diagnostics, is `PAPER_TAU` for every objective
    so that variants stay comparable; it does not follow `tau`.
    """
    if name not in _RECIPES:
        raise ValueError(f"objective {name!r} is unknown; allowed: {', '.join(PRESETS)}")
    if isinstance(tau, int | float) and tau < 0:
        raise ValueError(f"tau={tau!r} must be >= 0 nats (the paper uses 0.8)")
    if isinstance(alpha, int | float) and alpha < 0:
        raise ValueError(f"alpha={alpha!r} must be >= 0 (the paper uses 1.0)")
    knobs = _Knobs(tau, alpha, top_k, tail, eps_low, eps_high, q, width, beta, entropy_bonus, seed)
    return Objective(
        _RECIPES[name](knobs),
        temperature=temperature,
        top_k=top_k,
        diagnostic_tau=diagnostic_tau,
        chunk_size=chunk_size,
        name=name,
    )
