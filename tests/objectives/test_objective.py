"""The composed objective: the EOPD loss by hand, reductions, invariances, fused path and diagnostics."""

import math

import pytest
import torch

from eopd.objectives import (
    PRESETS,
    HardGate,
    LinearLogits,
    NoGate,
    Objective,
    Term,
    forward_kl,
    masked_mean,
    per_token_fused,
    preset,
    reverse_kl,
    teacher_token_stats,
    token_mean,
)

B, T, V, H = 3, 5, 13, 8


def make_batch(seed=0, vocab=V, hidden=False):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, vocab, generator=g)
    teacher = torch.randn(B, T, vocab, generator=g) * torch.tensor([8.0, 0.2, 3.0])[:, None, None]
    tokens = torch.randint(0, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 3:] = False
    mask[2, 1:] = False
    old = torch.log_softmax(student + 0.3 * torch.randn(B, T, vocab, generator=g), -1)
    old = old.gather(-1, tokens[..., None]).squeeze(-1)
    # One per response, as GRPO's; from its own stream, so that the other draws stay what they were.
    advantages = torch.randn(B, generator=torch.Generator().manual_seed(seed + 100))[:, None].expand(B, T)
    batch = dict(student=student, teacher=teacher, tokens=tokens, mask=mask, old_logprobs=old)
    batch["advantages"] = advantages
    if hidden:
        batch["hs"] = torch.randn(B, T, H, generator=g)
        batch["ws"] = torch.randn(vocab, H, generator=g)
        batch["ht"] = torch.randn(B, T, H, generator=g)
        batch["wt"] = torch.randn(vocab, H, generator=g) * 2
    return batch


def eopd_by_hand(student, teacher, tokens, mask, old, tau=0.8, alpha=1.0, k=4, eps=0.2):
    """PAPER.md section 2 written out token by token in float64."""
    total, n = 0.0, int(mask.sum())
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            ls = torch.log_softmax(student[b, t].double(), -1)
            lt = torch.log_softmax(teacher[b, t].double(), -1)
            y = int(tokens[b, t])
            r = math.exp(float(ls[y]) - float(old[b, t]))
            a = float(lt[y]) - float(old[b, t])
            opd = max(-r * a, -min(max(r, 1 - eps), 1 + eps) * a)
            h = -float((lt.exp() * lt).sum())
            fkl = 0.0
            if h >= tau:
                top = torch.topk(teacher[b, t].double(), k).indices
                q = torch.softmax(teacher[b, t].double()[top], -1)
                fkl = float((q * (q.log() - ls[top])).sum())
            total += opd + alpha * fkl
    return total / n


def test_eopd_equals_hand_computation_with_known_gate_pattern():
    d = make_batch()
    obj = preset("eopd", top_k=4)
    out = obj(
        student=d["student"],
        teacher=d["teacher"],
        tokens=d["tokens"],
        mask=d["mask"],
        old_logprobs=d["old_logprobs"],
    )
    expected = eopd_by_hand(d["student"], d["teacher"], d["tokens"], d["mask"], d["old_logprobs"])
    assert float(out.loss) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # The fixture's rows have low, high and middling teacher entropy: the gate is neither all nor none.
    stats = teacher_token_stats(d["teacher"], d["tokens"], k=4)
    gated = (stats.entropy >= 0.8) & d["mask"]
    assert 0 < int(gated.sum()) < int(d["mask"].sum())
    assert out.metrics.means()["gate/fraction"] == pytest.approx(float(gated.sum() / d["mask"].sum()))


def test_opd_is_eopd_with_gate_never_open():
    d = make_batch()
    args = dict(
        student=d["student"],
        teacher=d["teacher"],
        tokens=d["tokens"],
        mask=d["mask"],
        old_logprobs=d["old_logprobs"],
    )
    opd = preset("opd", top_k=4)(**args).loss
    never = preset("eopd", top_k=4, tau=math.inf)(**args).loss
    assert float(opd) == pytest.approx(float(never), rel=1e-6)


@pytest.mark.parametrize("name", ["fkl", "rkl"])
def test_full_vocabulary_presets_are_token_means(name):
    d = make_batch()
    out = preset(name, top_k=4)(
        student=d["student"], teacher=d["teacher"], tokens=d["tokens"], mask=d["mask"]
    )
    fn = forward_kl if name == "fkl" else reverse_kl
    expected = masked_mean(fn(d["student"], d["teacher"]), d["mask"])
    assert float(out.loss) == pytest.approx(float(expected), rel=1e-5)


def _loss_and_grad(obj, student, **kw):
    student = student.clone().requires_grad_(True)
    out = obj(student=student, **kw)
    out.loss.backward()
    return out.loss.detach(), student.grad


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_padding_invariant(name):
    d = make_batch()
    obj = preset(name, top_k=4)
    kw = dict(teacher=d["teacher"], tokens=d["tokens"], mask=d["mask"], old_logprobs=d["old_logprobs"])
    kw["advantages"] = d["advantages"]
    loss, grad = _loss_and_grad(obj, d["student"], **kw)
    assert torch.isfinite(loss)
    # Garbage at padded positions changes neither the loss nor the gradient at valid positions.
    noisy_student = torch.where(d["mask"][..., None], d["student"], torch.randn(B, T, V) * 50)
    noisy_teacher = torch.where(d["mask"][..., None], d["teacher"], torch.randn(B, T, V) * 50)
    noisy_advantages = torch.where(d["mask"], d["advantages"], torch.randn(B, T) * 50)
    kw2 = dict(
        kw, teacher=noisy_teacher, tokens=torch.where(d["mask"], d["tokens"], 0), advantages=noisy_advantages
    )
    loss2, grad2 = _loss_and_grad(obj, noisy_student, **kw2)
    torch.testing.assert_close(loss2, loss)
    torch.testing.assert_close(grad2, grad)
    assert grad2[~d["mask"]].abs().max() == 0


@pytest.mark.parametrize("name", PRESETS)
def test_all_masked_batch_gives_zero_not_nan(name):
    d = make_batch()
    mask = torch.zeros(B, T, dtype=torch.bool)
    student = d["student"].clone().requires_grad_(True)
    out = preset(name, top_k=4)(
        student=student,
        teacher=d["teacher"],
        tokens=d["tokens"],
        mask=mask,
        old_logprobs=d["old_logprobs"],
        advantages=d["advantages"],
    )
    out.loss.backward()
    assert float(out.loss) == 0.0
    assert torch.isfinite(student.grad).all() and student.grad.abs().max() == 0
    assert all(math.isfinite(v) for v in out.metrics.means().values())


@pytest.mark.parametrize("name", ["eopd", "eopd_quantile", "eopd_random", "jsd", "opd_entropy_bonus"])
def test_micro_batch_and_shard_invariance(name):
    """Splitting rows into micro-batches (or ranks) with the global token count gives the same loss and grads."""
    d = make_batch(seed=1)
    obj = preset(name, top_k=4)
    stats = teacher_token_stats(d["teacher"], d["tokens"], k=4)
    gates = obj.gate_weights(stats.entropy, d["mask"], step=3)  # once, over the whole rollout batch
    common = dict(
        teacher=d["teacher"],
        teacher_stats=stats,
        tokens=d["tokens"],
        mask=d["mask"],
        old_logprobs=d["old_logprobs"],
        gate_weights=gates,
        step=3,
    )
    full_loss, full_grad = _loss_and_grad(obj, d["student"], **common)

    student = d["student"].clone().requires_grad_(True)
    n_global = int(d["mask"].sum())
    total = 0.0
    metrics = []
    for rows in ([0], [1, 2]):
        out = obj(
            student=student[rows],
            teacher=d["teacher"][rows],
            teacher_stats=stats.rows(rows),
            tokens=d["tokens"][rows],
            mask=d["mask"][rows],
            old_logprobs=d["old_logprobs"][rows],
            gate_weights=gates[:, rows],
            step=3,
            num_valid_tokens=n_global,
        )
        out.loss.backward()
        total += float(out.loss)
        metrics.append(out.metrics)
    assert total == pytest.approx(float(full_loss), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(student.grad, full_grad, rtol=1e-5, atol=1e-7)
    merged = metrics[0].merge(metrics[1:]).means()
    whole = obj(student=d["student"], **common).metrics.means()
    for key in ("loss/total", "entropy/student", "div/fkl", "gate/fraction"):
        assert merged[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("name", ["eopd", "fkl", "jsd", "eopd_soft"])
def test_chunked_equals_unchunked(name):
    d = make_batch(seed=2)
    kw = dict(teacher=d["teacher"], tokens=d["tokens"], mask=d["mask"], old_logprobs=d["old_logprobs"])
    loss1, grad1 = _loss_and_grad(preset(name, top_k=4, chunk_size=10_000), d["student"], **kw)
    loss2, grad2 = _loss_and_grad(preset(name, top_k=4, chunk_size=3), d["student"], **kw)
    torch.testing.assert_close(loss1, loss2)
    torch.testing.assert_close(grad1, grad2)


@pytest.mark.parametrize("name", ["eopd", "fkl", "rkl_plus_fkl"])
def test_fused_linear_equals_materialised_logits(name):
    d = make_batch(seed=3, hidden=True)
    obj = preset(name, top_k=4, chunk_size=4)
    hs = d["hs"].clone().requires_grad_(True)
    ws = d["ws"].clone().requires_grad_(True)
    logits = hs @ ws.T
    teacher_logits = d["ht"] @ d["wt"].T
    kw = dict(tokens=d["tokens"], mask=d["mask"], old_logprobs=d["old_logprobs"])
    plain = obj(student=logits, teacher=teacher_logits, **kw).loss
    g_h, g_w = torch.autograd.grad(plain, (hs, ws))
    fused = obj(student=LinearLogits(hs, ws), teacher=LinearLogits(d["ht"], d["wt"]), **kw).loss
    f_h, f_w = torch.autograd.grad(fused, (hs, ws))
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(f_h, g_h)
    torch.testing.assert_close(f_w, g_w)


def test_fused_linear_slices_padded_vocabulary_rows():
    d = make_batch(seed=4, hidden=True)
    padded = torch.cat([d["ws"], torch.randn(3, H) * 100])  # padded embedding rows past the tokenizer
    obj = preset("fkl", top_k=4)
    kw = dict(tokens=d["tokens"], mask=d["mask"], teacher=d["ht"] @ d["wt"].T)
    exact = obj(student=d["hs"] @ d["ws"].T, **kw).loss
    sliced = obj(student=LinearLogits(d["hs"], padded, vocab_size=V), **kw).loss
    torch.testing.assert_close(sliced, exact)


def test_per_token_fused_matches_plain_in_value_and_gradient():
    d = make_batch(seed=5, hidden=True)
    mask = d["mask"]
    hs = d["hs"][mask].clone().requires_grad_(True)
    student = LinearLogits(hs, d["ws"])
    teacher = LinearLogits(d["ht"][mask], d["wt"])
    fused = per_token_fused(forward_kl, student, teacher, chunk_size=3)
    plain = forward_kl(hs @ d["ws"].T, d["ht"][mask] @ d["wt"].T)
    torch.testing.assert_close(fused, plain)
    weights = torch.rand(fused.shape, generator=torch.Generator().manual_seed(0))
    (g_fused,) = torch.autograd.grad((fused * weights).sum(), hs)
    (g_plain,) = torch.autograd.grad((plain * weights).sum(), hs)
    torch.testing.assert_close(g_fused, g_plain)


def test_teacher_stats_chunked_equal_direct_and_fused():
    d = make_batch(seed=6, hidden=True)
    logits = d["ht"] @ d["wt"].T
    direct = teacher_token_stats(logits, d["tokens"], k=5, chunk_size=10_000)
    chunked = teacher_token_stats(LinearLogits(d["ht"], d["wt"]), d["tokens"], k=5, chunk_size=2)
    logp = torch.log_softmax(logits.double(), -1)
    torch.testing.assert_close(
        direct.token_logprobs.double(), logp.gather(-1, d["tokens"][..., None])[..., 0]
    )
    # float32 statistics against float64 definitions: a few float32 units in the last place
    torch.testing.assert_close(direct.entropy.double(), -(logp.exp() * logp).sum(-1), rtol=1e-6, atol=1e-6)
    for field in ("token_logprobs", "entropy", "topk_logprobs"):
        torch.testing.assert_close(getattr(chunked, field), getattr(direct, field), rtol=1e-5, atol=1e-5)
    assert torch.equal(chunked.topk_indices, direct.topk_indices)


@pytest.mark.parametrize("source", ["logits", "linear"])
def test_teacher_stats_over_the_valid_positions_only_equal_those_of_every_position(source):
    # With a mask the tiles cover the valid response tokens only (no work on the padding); their
    # statistics are those computed over every position, and the padding gets harmless placeholders.
    d = make_batch(seed=7, hidden=True)
    teacher = d["ht"] @ d["wt"].T if source == "logits" else LinearLogits(d["ht"], d["wt"])
    mask = d["mask"]
    assert not bool(mask.all())
    every = teacher_token_stats(teacher, d["tokens"], k=5, chunk_size=3)
    valid = teacher_token_stats(teacher, d["tokens"], k=5, chunk_size=3, mask=mask)
    for field in ("token_logprobs", "entropy", "topk_logprobs", "topk_indices"):
        assert getattr(valid, field).shape == getattr(every, field).shape
        torch.testing.assert_close(
            getattr(valid, field)[mask], getattr(every, field)[mask], rtol=1e-6, atol=1e-6
        )
    assert bool((valid.entropy[~mask] == 0).all()) and bool((valid.token_logprobs[~mask] == 0).all())
    torch.testing.assert_close(valid.topk_mass[~mask], torch.ones(int((~mask).sum())))
    with pytest.raises(ValueError, match="mask shape"):
        teacher_token_stats(teacher, d["tokens"], k=5, mask=mask[:, :-1])


def test_token_mean_with_global_count_and_masked_mean():
    values = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 5.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert float(masked_mean(values, mask)) == pytest.approx(2.0)
    assert float(token_mean(values, mask, num_valid_tokens=6)) == pytest.approx(1.0)
    assert float(masked_mean(values, torch.zeros_like(mask))) == 0.0


def test_diagnostics_are_reported_whatever_trains():
    d = make_batch()
    for name in ("opd", "fkl", "eopd"):
        m = preset(name, top_k=4)(
            student=d["student"],
            teacher=d["teacher"],
            tokens=d["tokens"],
            mask=d["mask"],
            old_logprobs=d["old_logprobs"],
        ).metrics.means()
        for key in (
            "div/fkl",
            "div/rkl",
            "div/k1",
            "entropy/teacher",
            "entropy/student",
            "gate/fraction",
            "div/fkl_high_entropy",
            "div/fkl_low_entropy",
            "teacher/topk_mass",
            "ppo/approx_kl",
            "entropy/teacher_high_frac",
            "loss/total",
        ):
            assert key in m, (name, key)
    # The exact diagnostics match the divergences computed directly.
    expected = masked_mean(forward_kl(d["student"], d["teacher"]), d["mask"])
    assert m["div/fkl"] == pytest.approx(float(expected), rel=1e-5)
    assert m["ppo/clip_fraction"] >= 0


def test_clip_fraction_and_ratio_diagnostics():
    d = make_batch()
    obj = preset("opd", top_k=4, eps_low=0.01, eps_high=0.01)
    m = obj(
        student=d["student"],
        teacher=d["teacher"],
        tokens=d["tokens"],
        mask=d["mask"],
        old_logprobs=d["old_logprobs"],
    ).metrics.means()
    assert 0 < m["ppo/clip_fraction"] <= 1  # the old policy differs from the current: some tokens clip
    m = obj(student=d["student"], teacher=d["teacher"], tokens=d["tokens"], mask=d["mask"]).metrics.means()
    assert m["ppo/clip_fraction"] == 0 and m["ppo/approx_kl"] == pytest.approx(0.0, abs=1e-7)


def test_bad_input_raises_clear_errors():
    d = make_batch()
    kw = dict(student=d["student"], teacher=d["teacher"], tokens=d["tokens"], mask=d["mask"])
    with pytest.raises(ValueError, match="objective 'nope' is unknown; allowed: opd, eopd"):
        preset("nope")
    with pytest.raises(ValueError, match="tau=-0.1"):
        preset("eopd", tau=-0.1)
    with pytest.raises(ValueError, match="alpha=-1"):
        preset("eopd", alpha=-1)
    with pytest.raises(ValueError, match="eps_low=0"):
        preset("opd", eps_low=0)
    with pytest.raises(ValueError, match="beta=1.2"):
        preset("jsd", beta=1.2)
    with pytest.raises(ValueError, match="top_k=20 exceeds the vocabulary size 13"):
        preset("eopd", top_k=20)(**kw)
    with pytest.raises(ValueError, match="vocab size"):
        preset("eopd", top_k=4)(**dict(kw, teacher=d["teacher"][..., :-1]))
    with pytest.raises(ValueError, match="mask shape"):
        preset("eopd", top_k=4)(**dict(kw, mask=d["mask"][:, :-1]))
    bad = d["student"].clone()
    bad[1, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="student logits contain NaN"):
        preset("eopd", top_k=4)(**dict(kw, student=bad))
    bad[1, 1, 2] = -math.inf
    with pytest.raises(ValueError, match="student logits contain NaN or inf"):
        preset("eopd", top_k=4)(**dict(kw, student=bad))
    huge = d["student"].clone()
    huge[0, 0, :2] = 3e38  # finite, though their sum is not: the values decide
    bad = d["student"].clone()
    bad[~d["mask"].bool()] = float("nan")  # only where the mask is false: never read
    for student in (huge, bad):
        assert torch.isfinite(preset("eopd", top_k=4)(**dict(kw, student=student)).loss)
    with pytest.raises(ValueError, match="need the teacher's full logits"):
        stats = teacher_token_stats(d["teacher"], d["tokens"], k=4)
        preset("fkl", top_k=4)(**dict(kw, teacher=None), teacher_stats=stats)
    with pytest.raises(ValueError, match="temperature"):
        stats = teacher_token_stats(d["teacher"], d["tokens"], k=4, temperature=0.7)
        preset("eopd", top_k=4)(**kw, teacher_stats=stats)
    with pytest.raises(ValueError, match="term kind 'fk' is unknown"):
        Term("fk")
    with pytest.raises(ValueError, match="unknown options"):
        Term("topk_fkl", options={"kk": 3})
    with pytest.raises(ValueError, match="must be >= 0"):
        Term("topk_fkl", weight=-0.5, gate=HardGate(0.8))
    with pytest.raises(ValueError, match="at least one term"):
        Objective(())
    assert Objective((Term("forward_kl", gate=NoGate()),)).needs_teacher_logits


def test_fused_gradients_scale_with_the_upstream_gradient_and_allow_one_backward():
    d = make_batch(seed=7, hidden=True)
    obj = preset("eopd", top_k=4, chunk_size=4)
    kw = dict(tokens=d["tokens"], mask=d["mask"], old_logprobs=d["old_logprobs"], teacher=d["ht"] @ d["wt"].T)
    hs = d["hs"].clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(obj(student=LinearLogits(hs, d["ws"]), **kw).loss, hs)
    (g3,) = torch.autograd.grad(3.0 * obj(student=LinearLogits(hs, d["ws"]), **kw).loss, hs)
    torch.testing.assert_close(g3, 3.0 * g1)
    loss = obj(student=LinearLogits(hs, d["ws"]), **kw).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass"):
        loss.backward()


def eopd_reference_float64(student, teacher, tokens, mask, old, *, tau, alpha, k, eps, temperature):
    """PAPER.md section 2 in float64 with autograd over the full softmax: the reference gradient."""
    ls = torch.log_softmax(student.double() / temperature, -1)
    lt = torch.log_softmax(teacher.double() / temperature, -1)
    token_s = ls.gather(-1, tokens[..., None]).squeeze(-1)
    old = token_s.detach() if old is None else old.double()
    r = torch.exp(token_s - old)
    a = lt.gather(-1, tokens[..., None]).squeeze(-1) - old
    opd = torch.maximum(-r * a, -r.clamp(1 - eps, 1 + eps) * a)
    entropy = -(lt.exp() * lt).sum(-1)
    top_t, top_i = lt.topk(k, -1)
    q = torch.softmax(top_t, -1)
    fkl = (q * (q.log() - ls.gather(-1, top_i))).sum(-1)
    per_token = opd + alpha * (entropy >= tau).double() * fkl
    return (per_token * mask).sum() / mask.sum()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_old", [True, False])
@pytest.mark.parametrize("fused", [False, True])
def test_closed_form_gradient_from_teacher_statistics_matches_float64_autograd(temperature, with_old, fused):
    # With teacher statistics only, OPD/EOPD form each tile's gradient in closed form instead of autograd
    # through the softmax: it must agree with autograd on the definition, in value and gradient.
    d = make_batch(seed=5, hidden=True)
    old = d["old_logprobs"] if with_old else None
    hs = d["hs"].clone().requires_grad_(True)
    ws = d["ws"].clone().requires_grad_(True)
    logits = hs @ ws.T
    teacher = d["ht"] @ d["wt"].T * 3
    stats = teacher_token_stats(teacher, d["tokens"], k=4, temperature=temperature)
    obj = preset("eopd", top_k=4, temperature=temperature, chunk_size=4)
    assert all(term.sparse for term in obj.terms)
    student = LinearLogits(hs, ws) if fused else logits
    loss = obj(
        student=student, tokens=d["tokens"], mask=d["mask"], teacher_stats=stats, old_logprobs=old
    ).loss
    g_h, g_w = torch.autograd.grad(loss, (hs, ws))
    ref = eopd_reference_float64(
        hs @ ws.T,
        teacher,
        d["tokens"],
        d["mask"],
        old,
        tau=0.8,
        alpha=1.0,
        k=4,
        eps=0.2,
        temperature=temperature,
    )
    r_h, r_w = torch.autograd.grad(ref, (hs, ws))
    assert 0 < float(((stats.entropy >= 0.8) & d["mask"]).float().mean()) < float(d["mask"].float().mean())
    assert float(loss) == pytest.approx(float(ref), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(g_h, r_h.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_w, r_w.float(), rtol=1e-4, atol=1e-6)


def assert_closed_form_matches_autograd(obj, student, monkeypatch, **kw):
    """Loss, gradient and every diagnostic of the closed-form tiles equal the autograd tiles'."""
    fast_loss, fast_grad = _loss_and_grad(obj, student, **kw)
    fast_metrics = obj(student=student, **kw).metrics.means()
    monkeypatch.setattr(Term, "closed_form", property(lambda self: False))
    slow_loss, slow_grad = _loss_and_grad(obj, student, **kw)
    slow_metrics = obj(student=student, **kw).metrics.means()
    torch.testing.assert_close(fast_loss, slow_loss)
    torch.testing.assert_close(fast_grad, slow_grad)
    assert fast_metrics.keys() == slow_metrics.keys()
    for key, value in slow_metrics.items():
        assert fast_metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("name", ["opd", "eopd", "eopd_soft", "eopd_quantile"])
def test_closed_form_and_autograd_paths_agree_in_loss_gradient_and_diagnostics(name, monkeypatch):
    d = make_batch(seed=6)
    stats = teacher_token_stats(d["teacher"], d["tokens"], k=4)
    kw = dict(tokens=d["tokens"], mask=d["mask"], teacher_stats=stats, old_logprobs=d["old_logprobs"])
    obj = preset(name, top_k=4, chunk_size=5)
    assert_closed_form_matches_autograd(obj, d["student"], monkeypatch, **kw)


@pytest.mark.parametrize(
    ("name", "with_teacher"),
    [("fkl", True), ("rkl", True), ("opd_entropy_bonus", False), ("eopd", True), ("opd", True)],
)
def test_closed_form_and_autograd_paths_agree_for_full_vocabulary_terms(name, with_teacher, monkeypatch):
    # Full-vocabulary KL and the entropy bonus also form their gradient in closed form; with the teacher's
    # logits given, so do OPD/EOPD (their diagnostics then include the exact forward and reverse KL).
    d = make_batch(seed=7)
    stats = teacher_token_stats(d["teacher"], d["tokens"], k=4, temperature=0.7)
    kw = dict(tokens=d["tokens"], mask=d["mask"], teacher_stats=stats, old_logprobs=d["old_logprobs"])
    if with_teacher:
        kw["teacher"] = d["teacher"]
    obj = preset(name, top_k=4, chunk_size=5, temperature=0.7)
    assert all(term.closed_form for term in obj.terms)
    assert_closed_form_matches_autograd(obj, d["student"], monkeypatch, **kw)


def test_several_dense_terms_share_one_closed_form_tile(monkeypatch):
    # The last dense term builds its gradient in the teacher's tensors: the ones before it must not.
    d = make_batch(seed=9)
    obj = Objective(
        (
            Term("ppo_rkl"),
            Term("reverse_kl", weight=0.5),
            Term("forward_kl", gate=HardGate(0.8), name="fkl_gated"),
            Term("entropy_bonus", weight=0.01),
            Term("forward_kl", weight=0.3, name="fkl_all"),
        ),
        top_k=4,
        chunk_size=4,
    )
    kw = dict(tokens=d["tokens"], mask=d["mask"], teacher=d["teacher"], old_logprobs=d["old_logprobs"])
    assert_closed_form_matches_autograd(obj, d["student"], monkeypatch, **kw)


@pytest.mark.parametrize("direction", ["fkl", "rkl"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_closed_form_full_kl_gradient_matches_float64_autograd_on_the_definition(direction, temperature):
    d = make_batch(seed=8, hidden=True)
    hs = d["hs"].clone().requires_grad_(True)
    ws = d["ws"].clone().requires_grad_(True)
    teacher = LinearLogits(d["ht"], d["wt"])
    obj = preset(direction, top_k=4, chunk_size=4, temperature=temperature)
    loss = obj(student=LinearLogits(hs, ws), tokens=d["tokens"], mask=d["mask"], teacher=teacher).loss
    g_h, g_w = torch.autograd.grad(loss, (hs, ws))

    ls = torch.log_softmax((hs @ ws.T).double() / temperature, -1)
    lt = torch.log_softmax((d["ht"] @ d["wt"].T).double() / temperature, -1)
    kl = (lt.exp() * (lt - ls)).sum(-1) if direction == "fkl" else (ls.exp() * (ls - lt)).sum(-1)
    ref = (kl * d["mask"]).sum() / d["mask"].sum()
    r_h, r_w = torch.autograd.grad(ref, (hs, ws))
    assert float(loss) == pytest.approx(float(ref), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(g_h, r_h.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_w, r_w.float(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["eopd", "fkl", "jsd"])  # closed-form (sparse, dense) and autograd tiles
def test_token_logprobs_out_holds_the_students_sampled_token_logprobs(name):
    d = make_batch(seed=10)
    out = torch.full(d["tokens"].shape, float("nan"))
    obj = preset(name, top_k=4, chunk_size=4, temperature=0.7)

    obj(
        student=d["student"], tokens=d["tokens"], mask=d["mask"], teacher=d["teacher"], token_logprobs_out=out
    )

    expected = torch.log_softmax(d["student"].double() / 0.7, -1).gather(-1, d["tokens"][..., None])[..., 0]
    torch.testing.assert_close(out[d["mask"]], expected[d["mask"]].float())
    assert out[~d["mask"]].isnan().all(), "positions outside the mask are left as they were"


def test_jsd_keeps_the_autograd_path():
    assert not all(term.closed_form for term in preset("jsd").terms)


def test_bucket_tail_is_not_sparse():
    assert not preset("eopd", top_k=4, tail="bucket").terms[1].sparse
