"""Gates over a chosen signal, term normalisers, and the later papers' presets (TIP, SEAD, REOPOLD) and the
reward baselines (GRPO), each against a float64 reference written from its definition."""

import math

import numpy as np
import pytest
import torch

from eopd.objectives import (
    AllOf,
    AnyOf,
    HardGate,
    Not,
    Objective,
    Signals,
    Term,
    preset,
    teacher_token_stats,
)
from eopd.objectives.gates import Overconfident, QuantileGate, SoftOr
from eopd.objectives.policy_gradient import group_advantages
from eopd.objectives.terms import normalizer_weights

B, T, V = 4, 6, 11
K = 4


def make_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=g) * torch.tensor([0.3, 1.0, 3.0, 0.6])[:, None, None]
    teacher = torch.randn(B, T, V, generator=g) * torch.tensor([4.0, 0.3, 1.5, 1.0])[:, None, None]
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 4:] = False
    mask[3, 2:] = False
    old = torch.log_softmax(student + 0.4 * torch.randn(B, T, V, generator=g), -1)
    old = old.gather(-1, tokens[..., None]).squeeze(-1)
    advantages = torch.randn(B, generator=g)[:, None].expand(B, T).contiguous()
    return dict(student=student, teacher=teacher, tokens=tokens, mask=mask, old=old, advantages=advantages)


def per_token64(d):
    """Every per-token signal in float64, from the definitions, at the valid positions (flattened)."""
    m = d["mask"]
    ls = torch.log_softmax(d["student"].double(), -1)[m]
    lt = torch.log_softmax(d["teacher"].double(), -1)[m]
    ps, pt = ls.exp(), lt.exp()
    y = d["tokens"][m]
    return dict(
        ls=ls,
        lt=lt,
        y=y,
        old=d["old"][m].double(),
        adv=d["advantages"][m].double(),
        h_s=-(ps * ls).sum(-1),
        h_t=-(pt * lt).sum(-1),
        fkl=(pt * (lt - ls)).sum(-1),
        rkl=(ps * (ls - lt)).sum(-1),
        log_ratio=ls.gather(-1, y[:, None])[:, 0] - lt.gather(-1, y[:, None])[:, 0],
    )


def top_fraction(score, fraction):
    """1 on the round(fraction * n) highest scores (no ties in these fixtures)."""
    n_open = int(math.floor(fraction * score.numel() + 0.5))
    chosen = torch.zeros_like(score)
    chosen[torch.argsort(score, descending=True)[:n_open]] = 1.0
    return chosen


def min_max(x):
    return (x - x.min()) / (x.max() - x.min())


def ppo64(ls, y, old, advantage, eps=0.2):
    logp = ls.gather(-1, y[:, None])[:, 0]
    ratio = (logp - old).exp()
    return torch.maximum(-ratio * advantage, -ratio.clamp(1 - eps, 1 + eps) * advantage)


def call(objective, d, **kw):
    return objective(
        student=d["student"],
        teacher=d["teacher"],
        tokens=d["tokens"],
        mask=d["mask"],
        old_logprobs=d["old"],
        advantages=d["advantages"],
        **kw,
    )


# ---- gates over a chosen signal ---------------------------------------------------------------------


def test_a_gate_reads_the_signal_it_names_and_a_bare_tensor_is_the_teacher_entropy():
    mask = torch.tensor([True, True, True, False])
    signals = Signals(
        teacher_entropy=torch.tensor([0.1, 0.9, 2.0, 5.0]), student_entropy=torch.tensor([1.0, 0.2, 0.0, 9.0])
    )
    assert HardGate(0.8)(signals, mask).tolist() == [0.0, 1.0, 1.0, 0.0]
    assert HardGate(0.8)(signals.teacher_entropy, mask).tolist() == [0.0, 1.0, 1.0, 0.0]
    assert HardGate(0.8, signal="student_entropy")(signals, mask).tolist() == [1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="signal 'rkl', which was not measured"):
        HardGate(0.8, signal="rkl")(signals, mask)
    with pytest.raises(ValueError, match="signal='entropy' is unknown"):
        HardGate(0.8, signal="entropy")


def test_all_of_any_of_and_not_are_intersection_union_and_complement_on_valid_tokens():
    mask = torch.tensor([True, True, True, True, False])
    signals = Signals(
        teacher_entropy=torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0]),
        student_entropy=torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0]),
    )
    t, s = HardGate(0.5), HardGate(0.5, signal="student_entropy")
    assert AllOf((t, s))(signals, mask).tolist() == [0, 0, 0, 1, 0]
    assert AnyOf((t, s))(signals, mask).tolist() == [0, 1, 1, 1, 0]
    assert Not(t)(signals, mask).tolist() == [1, 0, 1, 0, 0]
    assert AllOf((t, s)).signals == {"teacher_entropy", "student_entropy"}


def test_soft_or_and_overconfident_scores_match_their_definitions():
    d = make_batch()
    x = per_token64(d)
    mask = torch.ones(x["h_s"].shape, dtype=torch.bool)
    signals = Signals(teacher_entropy=x["h_t"], student_entropy=x["h_s"], fkl=x["fkl"], rkl=x["rkl"])
    a, b = min_max(x["h_s"]), min_max(x["rkl"])
    torch.testing.assert_close(SoftOr()(signals, mask).double(), a + b - a * b, rtol=1e-5, atol=1e-6)
    expected = x["fkl"] * (1 - min_max(x["h_s"]))
    torch.testing.assert_close(Overconfident()(signals, mask).double(), expected, rtol=1e-5, atol=1e-6)


# ---- presets against float64 references -------------------------------------------------------------


def test_tip_global_is_the_reverse_kl_averaged_over_the_top_rho_tokens_of_the_batch_by_the_soft_or():
    d = make_batch()
    x = per_token64(d)
    a, b = min_max(x["h_s"]), min_max(x["rkl"])
    kept = top_fraction(a + b - a * b, 0.5)
    expected = float((kept * x["rkl"]).sum() / kept.sum())
    out = call(preset("tip_global", top_k=K, rho=0.5), d)
    assert float(out.loss) == pytest.approx(expected, rel=1e-5)
    assert out.metrics.means()["gate/fraction"] == pytest.approx(float(kept.mean()))


def tip_kept64(x, rows, rho, clip=0.98):
    """TIP's rule from its definition: the student's entropy clipped at the batch's `clip` quantile (linear
    interpolation, as numpy's default), both axes min-max normalised over the batch, soft-OR, then in each
    response the floor(rho x its length) highest scores."""
    h = x["h_s"].clamp(max=float(np.quantile(x["h_s"].numpy(), clip)))
    a, b = min_max(h), min_max(x["rkl"])
    score = a + b - a * b
    kept = torch.zeros_like(score)
    for row in rows.unique():
        where = (rows == row).nonzero()[:, 0]
        count = math.floor(rho * len(where))
        kept[where[torch.argsort(score[where], descending=True)[:count]]] = 1.0
    return kept


@pytest.mark.parametrize("rho", [0.5, 0.3])
def test_tip_keeps_floor_rho_times_each_responses_length_by_the_clipped_soft_or_score(rho):
    d = make_batch()
    x = per_token64(d)
    rows = torch.arange(B)[:, None].expand(B, T)[d["mask"]]
    kept = tip_kept64(x, rows, rho)
    expected = float((kept * x["rkl"]).sum() / kept.sum())
    assert float(call(preset("tip", top_k=K, rho=rho), d).loss) == pytest.approx(expected, rel=1e-5)
    lengths = d["mask"].sum(-1)
    per_row = torch.zeros(B).index_add_(0, rows, kept.float())
    assert per_row.tolist() == [math.floor(rho * int(n)) for n in lengths]  # every response its share


def test_the_clip_changes_which_tokens_tip_keeps_when_one_entropy_dwarfs_the_rest():
    # One token far more uncertain than the rest squashes the others' normalised entropies toward 0
    # unless it is clipped first.
    mask = torch.ones(1, 6, dtype=torch.bool)
    signals = Signals(
        teacher_entropy=torch.zeros(1, 6),
        student_entropy=torch.tensor([[50.0, 1.0, 0.9, 0.2, 0.1, 0.0]]),
        rkl=torch.tensor([[0.0, 0.0, 0.1, 0.6, 0.5, 1.0]]),
    )
    clipped = QuantileGate(0.5, SoftOr("student_entropy", "rkl", 0.8), per_response=True)(signals, mask)
    unclipped = QuantileGate(0.5, SoftOr("student_entropy", "rkl"), per_response=True)(signals, mask)
    assert clipped.tolist() != unclipped.tolist()
    assert clipped.sum() == unclipped.sum() == 3


def test_tip_q3_keeps_the_confident_tokens_the_teacher_disagrees_with():
    d = make_batch()
    x = per_token64(d)
    kept = top_fraction(x["fkl"] * (1 - min_max(x["h_s"])), 0.2)
    expected = float((kept * x["rkl"]).sum() / kept.sum())
    assert float(call(preset("tip_q3", top_k=K, rho_q3=0.2), d).loss) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("step", [0, 7, 20])
def test_sead_zones_and_the_cosine_from_forward_to_reverse_kl(step):
    d = make_batch()
    x = per_token64(d)
    teacher_high = top_fraction(x["h_t"], 0.1)
    student_high = (1 - teacher_high) * top_fraction(x["h_s"], 0.5)
    w = 0.8 * 0.5 * (1 + math.cos(math.pi * min(step / 20, 1.0)))  # fkl_start 0.8 -> 0 over 20 steps
    supervised = torch.maximum(teacher_high, student_high)
    per_token = teacher_high * x["fkl"] + student_high * (w * x["fkl"] + (1 - w) * x["rkl"])
    expected = float(per_token.sum() / supervised.sum())
    objective = preset(
        "sead", top_k=K, zone_teacher_q=0.1, zone_student_q=0.5, fkl_start=0.8, anneal_steps=20
    )
    assert float(call(objective, d, step=step).loss) == pytest.approx(expected, rel=1e-5)
    # Both entropies low: no gradient there.
    skipped = (1 - supervised).bool()
    assert skipped.any()


@pytest.mark.parametrize("step", [0, 4, 5, 9])
def test_reopold_clips_the_reward_below_and_switches_its_mask_at_switch_step(step):
    d = make_batch()
    x = per_token64(d)
    lam = 0.3
    floor = math.log(lam) / (1 - lam)
    assert floor == pytest.approx(-1.72, abs=1e-3)
    lt_y = x["lt"].gather(-1, x["y"][:, None])[:, 0]
    reward = lt_y - x["old"]  # log p_te(y) - log p_old(y)
    # Exploration: the tokens whose reward at the rollout policy is above the floor; refinement: the top
    # 20% by the student's entropy.
    kept = (-x["log_ratio"] > floor).double() if step < 5 else top_fraction(x["h_s"], 0.2)
    assert 0 < kept.sum() < kept.numel()
    per_token = ppo64(x["ls"], x["y"], x["old"], reward.clamp(min=floor))
    expected = float((kept * per_token).sum() / kept.sum())
    objective = preset("reopold", top_k=K, mix_lambda=lam, keep=0.2, switch_step=5)
    assert float(call(objective, d, step=step).loss) == pytest.approx(expected, rel=1e-5)


def test_the_reward_floor_only_raises_advantages_below_it():
    d = make_batch()
    x = per_token64(d)
    lt_y = x["lt"].gather(-1, x["y"][:, None])[:, 0]
    floor = -0.5
    objective = Objective((Term("ppo_rkl", options={"reward_floor": floor}),), top_k=K)
    expected = float(ppo64(x["ls"], x["y"], x["old"], (lt_y - x["old"]).clamp(min=floor)).mean())
    assert float(call(objective, d).loss) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="reward_floor=0.5 must be < 0"):
        Term("ppo_rkl", options={"reward_floor": 0.5})


def test_grpo_is_the_clipped_surrogate_on_the_advantage_and_grpo_kd_adds_the_opd_term():
    d = make_batch()
    x = per_token64(d)
    grpo = float(ppo64(x["ls"], x["y"], x["old"], x["adv"]).mean())
    assert float(call(preset("grpo", top_k=K), d).loss) == pytest.approx(grpo, rel=1e-5)
    lt_y = x["lt"].gather(-1, x["y"][:, None])[:, 0]
    opd = float(ppo64(x["ls"], x["y"], x["old"], lt_y - x["old"]).mean())
    got = float(call(preset("grpo_kd", top_k=K, kd_coef=0.3), d).loss)
    assert got == pytest.approx(grpo + 0.3 * opd, rel=1e-5)


def test_a_reward_objective_without_advantages_is_refused():
    d = make_batch()
    with pytest.raises(ValueError, match="need a task reward's advantages"):
        preset("grpo", top_k=K)(
            student=d["student"], teacher=d["teacher"], tokens=d["tokens"], mask=d["mask"]
        )


def test_group_advantages_centre_and_scale_within_each_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    got = group_advantages(rewards, 4).double()
    expected = []
    for group in rewards.double().reshape(2, 4):
        mean, std = group.mean(), group.std()  # Bessel's correction, as verl
        expected += ((group - mean) / (std + 1e-6)).tolist()
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert group_advantages(torch.ones(4), 4).abs().max() == 0  # all equal: no signal
    with pytest.raises(ValueError, match="group_size=1 must be >= 2"):
        group_advantages(rewards, 1)


# ---- splitting a batch changes nothing --------------------------------------------------------------


@pytest.mark.parametrize("name", ["tip", "sead", "reopold", "grpo_kd", "eopd"])
def test_split_batches_with_whole_batch_gates_and_normalisers_equal_the_unsplit_loss(name):
    """A trainer decides the gates once over the rollout batch (score_rollout) and passes each term's
    normaliser over the whole batch: micro-batches (or ranks) then add up to the unsplit loss and gradient."""
    d = make_batch(seed=3)
    objective = preset(name, top_k=K, switch_step=1, anneal_steps=10)
    step = 3
    stats = teacher_token_stats(d["teacher"], d["tokens"], k=K)
    scores = objective.score_rollout(
        student=d["student"],
        tokens=d["tokens"],
        mask=d["mask"],
        teacher_stats=stats,
        teacher=d["teacher"],
        step=step,
    )
    normalizers = normalizer_weights(objective.terms, scores.gate_weights, d["mask"]).flatten(1).sum(-1)
    common = dict(
        teacher_stats=stats, step=step, num_valid_tokens=int(d["mask"].sum()), normalizers=normalizers
    )

    whole = d["student"].clone().requires_grad_(True)
    full = objective(
        student=whole,
        teacher=d["teacher"],
        tokens=d["tokens"],
        mask=d["mask"],
        old_logprobs=d["old"],
        advantages=d["advantages"],
        gate_weights=scores.gate_weights,
        **common,
    ).loss
    full.backward()
    # The gates decided inside a plain call are the same as score_rollout's.
    plain = call(objective, d, teacher_stats=stats, step=step).loss
    assert float(plain) == pytest.approx(float(full), rel=1e-6)

    parts = d["student"].clone().requires_grad_(True)
    total = 0.0
    for rows in ([0, 1], [2], [3]):
        out = objective(
            student=parts[rows],
            teacher=d["teacher"][rows],
            tokens=d["tokens"][rows],
            mask=d["mask"][rows],
            old_logprobs=d["old"][rows],
            advantages=d["advantages"][rows],
            gate_weights=scores.gate_weights[:, rows],
            **{**common, "teacher_stats": stats.rows(rows)},
        )
        out.loss.backward()
        total += float(out.loss)
    assert total == pytest.approx(float(full), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(parts.grad, whole.grad, rtol=1e-4, atol=1e-7)


def ppo_dual64(ls, y, old, advantage, eps=0.2, c=3.0):
    loss = ppo64(ls, y, old, advantage, eps)
    return torch.where(advantage < 0, torch.minimum(loss, -c * advantage), loss)


def test_the_dual_clip_caps_the_loss_of_negative_advantages_at_minus_c_a_and_stops_their_gradient():
    d = make_batch()
    d["old"] = d["old"] - 1.5  # ratios far above 1: some tokens pass the cap
    x = per_token64(d)
    lt_y = x["lt"].gather(-1, x["y"][:, None])[:, 0]
    advantage = lt_y - x["old"]
    per_token = ppo_dual64(x["ls"], x["y"], x["old"], advantage)
    plain = ppo64(x["ls"], x["y"], x["old"], advantage)
    assert (per_token < plain).any()  # the cap acts in this batch
    student = d["student"].clone().requires_grad_(True)
    out = call(Objective((Term("ppo_rkl", options={"dual_clip": 3.0}),), top_k=K), d | {"student": student})
    assert float(out.loss) == pytest.approx(float(per_token.mean()), rel=1e-5)

    ls64 = d["student"].double().requires_grad_(True)
    logp = torch.log_softmax(ls64, -1)[d["mask"]]
    ppo_dual64(logp, x["y"], x["old"], advantage).mean().backward()
    out.loss.backward()
    torch.testing.assert_close(student.grad.double(), ls64.grad, rtol=1e-4, atol=1e-7)


def test_a_dual_clip_at_or_below_one_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"dual_clip=1.0 must be > 1 .*verl uses 3"):
        preset("opd", dual_clip=1.0)
    with pytest.raises(ValueError, match=r"dual_clip=0.5 must be > 1"):
        Objective((Term("ppo_rkl", options={"dual_clip": 0.5}),), top_k=K)
