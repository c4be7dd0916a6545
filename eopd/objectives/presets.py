"""The named objectives: the paper's OPD and EOPD, their gate variants, the baselines it compares with, the
token-selection rules of later papers (TIP, SEAD, REOPOLD) and reinforcement-learning baselines (GRPO).

`preset(name, **knobs)` builds one; `PRESETS` lists the names. Each preset is one line of `_RECIPES`, a
tuple of `Term`s built from the shared knobs, so a new variant is one more line. The later papers' rules
are compositions of the same parts (a gate over a chosen signal, a divergence, a normaliser, a weight
schedule); where a paper leaves a detail open, `preset`'s docstring says what was chosen.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from eopd.objectives.gates import (
    PAPER_TAU,
    AllOf,
    Gate,
    HardGate,
    NoGate,
    Not,
    Overconfident,
    QuantileGate,
    RandomGate,
    SoftGate,
    SoftOr,
)
from eopd.objectives.objective import Objective
from eopd.objectives.terms import Term
from eopd.schedules import Cosine, Schedule, Step


@dataclass(frozen=True)
class _Knobs:
    """The preset's arguments, with the two terms every sampled-token preset builds from them."""

    tau: float | Schedule
    alpha: float | Schedule
    top_k: int
    tail: str
    eps_low: float
    eps_high: float
    dual_clip: float | None
    q: float | Schedule
    width: float
    beta: float
    entropy_bonus: float | Schedule
    seed: int
    rho: float
    rho_q3: float
    mix_lambda: float
    keep: float
    switch_step: int
    zone_teacher_q: float
    zone_student_q: float
    fkl_start: float
    anneal_steps: int
    kd_coef: float | Schedule

    @property
    def clip(self) -> dict[str, float | None]:
        return {"eps_low": self.eps_low, "eps_high": self.eps_high, "dual_clip": self.dual_clip}

    @property
    def ppo(self) -> Term:
        return Term("ppo_rkl", options=self.clip)

    def fkl(self, gate: Gate) -> Term:
        return Term("topk_fkl", weight=self.alpha, gate=gate, options={"k": self.top_k, "tail": self.tail})

    def tip(self, score: SoftOr | Overconfident, rho: float, per_response: bool) -> tuple[Term, ...]:
        # Eq. 7: the full-vocabulary reverse KL, averaged over the retained tokens only.
        gate = QuantileGate(rho, signal=score, per_response=per_response)
        return (Term("reverse_kl", gate=gate, normalize="gate"),)

    def sead(self) -> tuple[Term, ...]:
        teacher_high = QuantileGate(self.zone_teacher_q, signal="teacher_entropy")
        student_high = AllOf((Not(teacher_high), QuantileGate(self.zone_student_q, signal="student_entropy")))
        w_fkl = Cosine(self.fkl_start, 0.0, self.anneal_steps)
        w_rkl = Cosine(1.0 - self.fkl_start, 1.0, self.anneal_steps)
        return (
            Term("forward_kl", gate=teacher_high, normalize="selected", name="fkl_teacher_high"),
            Term(
                "forward_kl", weight=w_fkl, gate=student_high, normalize="selected", name="fkl_student_high"
            ),
            Term(
                "reverse_kl", weight=w_rkl, gate=student_high, normalize="selected", name="rkl_student_high"
            ),
        )

    def reopold(self) -> tuple[Term, ...]:
        floor = math.log(self.mix_lambda) / (1.0 - self.mix_lambda)  # Eq. 5: -1.72 at lambda 0.3
        options = {**self.clip, "reward_floor": floor}
        # Exploration: drop the tokens whose reward log p_te(y) - log p_old(y) is below the floor, i.e. whose
        # log p_old(y) - log p_te(y) exceeds -floor (Eq. 9). Refinement: the top `keep` of tokens by the
        # student's entropy, with the clipped reward (Eq. 10). Both average over the tokens they keep.
        explore = Not(HardGate(-floor, signal="log_ratio"))
        refine = QuantileGate(self.keep, signal="student_entropy")
        return (
            Term("ppo_rkl", Step((1.0, 0.0), (self.switch_step,)), explore, options, "ppo_explore", "gate"),
            Term("ppo_rkl", Step((0.0, 1.0), (self.switch_step,)), refine, options, "ppo_refine", "gate"),
        )

    @property
    def grpo(self) -> Term:
        return Term("ppo_reward", options=self.clip)


TIP_ENTROPY_CLIP = 0.98
"""TIP clips the student's entropy at this quantile of the rollout batch before min-max normalising it."""

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
    "tip": lambda k: k.tip(SoftOr("student_entropy", "rkl", TIP_ENTROPY_CLIP), k.rho, per_response=True),
    "tip_global": lambda k: k.tip(SoftOr("student_entropy", "rkl"), k.rho, per_response=False),
    "tip_q3": lambda k: k.tip(Overconfident("fkl", "student_entropy"), k.rho_q3, per_response=False),
    "sead": lambda k: k.sead(),
    "sead_tokens": lambda k: k.sead(),
    "reopold": lambda k: k.reopold(),
    "grpo": lambda k: (k.grpo,),
    "grpo_kd": lambda k: (k.grpo, Term("ppo_rkl", weight=k.kd_coef, options=k.clip)),
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
    dual_clip: float | None = None,
    q: float | Schedule = 0.2,
    width: float = 0.1,
    beta: float = 0.5,
    entropy_bonus: float | Schedule = 0.01,
    seed: int = 0,
    rho: float = 0.5,
    rho_q3: float = 0.2,
    mix_lambda: float = 0.3,
    keep: float = 0.2,
    switch_step: int = 100,
    zone_teacher_q: float = 0.1,
    zone_student_q: float = 0.5,
    fkl_start: float = 0.8,
    anneal_steps: int = 300,
    kd_coef: float | Schedule = 1.0,
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

    Later papers' token selection (every signal measured at the rollout policy, every batch-level rank
    and min-max over the valid tokens of the whole rollout batch):
        tip: TIP (2604.14084, section 6): the full-vocabulary reverse KL on the top `rho` of each response's
            tokens (floor(rho x its length)) by the soft-OR of the student's entropy, clipped at the batch's
            98th percentile, and the reverse KL, each min-max normalised over the batch; averaged over the
            kept tokens (Eq. 7). rho 0.5, the paper's best on maths.
        tip_global: tip's score without the clip, keeping the top `rho` of the whole batch's tokens (a
            response may keep none): the reading of TIP before the per-response rule.
        tip_q3: TIP's overconfident-token rule (section 7.3): the top `rho_q3` (0.2; the paper uses 0.2 and
            0.1) by forward KL x (1 - normalised student entropy), the same loss and mean.
        sead: SEAD (2606.28562) zones from the joint entropies: the top `zone_teacher_q` of tokens by the
            teacher's entropy get forward KL; of the rest, those in the top `zone_student_q` by the
            student's entropy get w x forward KL + (1 - w) x reverse KL with w following half a cosine from
            `fkl_start` (0.8) to 0 over `anneal_steps`; the others (both entropies low) get no gradient.
            Every term averages over the supervised tokens. The paper's full text was not available: the
            zone shares (10% / 45% / 45%), full-vocabulary divergences, the full-vocabulary entropies and
            applying the anneal to the student-high zone only are choices made here from its abstract and
            summaries. Its easy-to-hard prompt curriculum is data-side, in `eopd.curriculum`: the training
            config `objective=sead` selects `curriculum=sead`.
        sead_tokens: sead under its own name, for the ablation without the curriculum: the loss is the
            same, the prompts come from all training prompts (`objective=sead_tokens`).
        reopold: REOPOLD (2603.11137): the PPO-clipped sampled-token term with the reward
            log p_te(y) - log p_old(y) clipped below at log(mix_lambda) / (1 - mix_lambda) (Eq. 5); until
            `switch_step` on the tokens whose reward is above that floor (Eq. 9), from then on on the top
            `keep` of tokens by the student's entropy (Eq. 10); each averaged over the tokens it keeps.
            lambda 0.3, keep 0.2, the switch at a third of the run (the paper's Table 7).
    Reinforcement-learning baselines (the trainer grades every sample; `rollout.n_samples` > 1 forms the
    groups):
        grpo: PPO-clipped sampled-token surrogate on the group-normalised task reward; no teacher in the
            loss (it still scores every token for the diagnostics).
        grpo_kd: grpo plus kd_coef x the OPD term (kd_coef may follow a schedule).

    `diagnostic_tau`, the high/low-entropy split of the diagnostics, is `PAPER_TAU` for every objective
    so that variants stay comparable; it does not follow `tau`.
    """
    if name not in _RECIPES:
        raise ValueError(f"objective {name!r} is unknown; allowed: {', '.join(PRESETS)}")
    if isinstance(tau, int | float) and tau < 0:
        raise ValueError(f"tau={tau!r} must be >= 0 nats (the paper uses 0.8)")
    if isinstance(alpha, int | float) and alpha < 0:
        raise ValueError(f"alpha={alpha!r} must be >= 0 (the paper uses 1.0)")
    for knob, value in (
        ("rho", rho),
        ("rho_q3", rho_q3),
        ("keep", keep),
        ("zone_teacher_q", zone_teacher_q),
        ("zone_student_q", zone_student_q),
        ("fkl_start", fkl_start),
    ):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"objective.{knob}={value!r} must lie in [0, 1] (a fraction)")
    kept = {
        "tip": ("rho", rho),
        "tip_global": ("rho", rho),
        "tip_q3": ("rho_q3", rho_q3),
        "reopold": ("keep", keep),
    }
    kept["eopd_quantile"] = ("q", q)
    knob, value = kept.get(name, (None, None))
    if isinstance(value, int | float) and value == 0:
        raise ValueError(
            f"objective.{knob}=0 leaves objective {name!r} no token to train on (it keeps that fraction of "
            f"tokens); give a fraction in (0, 1], e.g. objective.{knob}=0.5"
        )
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"objective.dual_clip={dual_clip!r} must be > 1 (verl uses 3) or null for none")
    if not 0.0 < mix_lambda < 1.0:
        raise ValueError(f"objective.mix_lambda={mix_lambda!r} must lie in (0, 1) (REOPOLD uses 0.3)")
    for knob, value in (("switch_step", switch_step), ("anneal_steps", anneal_steps)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"objective.{knob}={value!r} must be a positive number of optimizer steps")
    knobs = _Knobs(
        tau, alpha, top_k, tail, eps_low, eps_high, dual_clip, q, width, beta, entropy_bonus, seed, rho, rho_q3, mix_lambda,
        keep, switch_step, zone_teacher_q, zone_student_q, fkl_start, anneal_steps, kd_coef,
    )  # fmt: skip
    return Objective(
        _RECIPES[name](knobs),
        temperature=temperature,
        top_k=top_k,
        diagnostic_tau=diagnostic_tau,
        chunk_size=chunk_size,
        name=name,
    )
