"""The tile kernels for large vocabularies and peaked distributions: the floored exp and the row-wise dot.

At a 150k vocabulary the objective's tiles take `row_dot` one BLAS dot per row, and a peaked teacher's
log-probs reach far below -87, where the exp is floored at the smallest normal number. Both must leave
losses, gradients and statistics those of the definitions, computed here in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from eopd.objectives import LinearLogits, preset, teacher_token_stats
from eopd.objectives.fused import (
    EXP_FLOOR,
    EXP_FLOOR_GLANCE,
    ROW_DOT_LOOP_MIN_COLUMNS,
    TOPK_GROUP_SIZE,
    TOPK_GROUPED_MIN_COLUMNS,
    exp_floored,
    row_dot,
    topk_groups,
    topk_rows,
)


def test_exp_floored_is_exp_down_to_a_normal_number_and_that_number_below():
    for dtype, scale in ((torch.float32, 1.0), (torch.float64, 3.0)):
        x = torch.linspace(-400.0, 5.0, 100_003, dtype=dtype) * scale
        floor = torch.tensor(EXP_FLOOR[dtype], dtype=dtype)
        assert float(torch.exp(floor)) >= torch.finfo(dtype).tiny, "the floor's exp is a normal number"
        above = x >= floor
        out = torch.empty_like(x)
        for value in (exp_floored(x), exp_floored(x, out=out)):
            assert torch.equal(value[above], torch.exp(x[above]))
            assert (value[~above] == torch.exp(floor)).all()
        assert exp_floored(x, out=out) is out
        narrow = x[x > -50]  # nothing below the floor: the plain exp, into `out` too
        assert torch.equal(exp_floored(narrow), torch.exp(narrow))
        assert exp_floored(narrow, out=out[: narrow.numel()]).data_ptr() == out.data_ptr()
    # A glance at each row's first columns decides nothing when they hold no value below the floor.
    late = torch.zeros(3, EXP_FLOOR_GLANCE + 10)
    late[1, -1] = -200.0
    assert float(exp_floored(late)[1, -1]) == pytest.approx(math.exp(EXP_FLOOR[torch.float32]))
    nan = torch.tensor([float("nan"), -200.0, 0.0])
    assert exp_floored(nan).isnan().tolist() == [True, False, False]
    half = torch.linspace(-20.0, 0.0, 101).half()  # float16's smallest normal is 6e-5: no floor there
    assert torch.equal(exp_floored(half), torch.exp(half))


@pytest.mark.parametrize("columns", [7, ROW_DOT_LOOP_MIN_COLUMNS + 5])
def test_row_dot_is_the_row_wise_sum_of_products(columns):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(33, columns, generator=g), torch.randn(33, columns, generator=g)
    expected = (a.double() * b.double()).sum(-1)
    torch.testing.assert_close(row_dot(a, b).double(), expected, rtol=1e-5, atol=1e-4)
    assert row_dot(a[:0], b[:0]).shape == (0,)
    leaf = a.clone().requires_grad_()
    row_dot(leaf, b).sum().backward()  # under autograd it is einsum, which has a gradient
    torch.testing.assert_close(leaf.grad, b)


def _peaked_batch(vocab: int):
    """A student and a teacher over `vocab` ids; the teacher's logits span hundreds of nats."""
    g = torch.Generator().manual_seed(3)
    B, T, H = 2, 6, 16
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False
    scale = torch.tensor([1.0, 20.0, 60.0]).repeat(B * T)[: B * T].reshape(B, T, 1)  # mild to very peaked
    return dict(
        hs=torch.randn(B, T, H, generator=g) * 2,
        ws=torch.randn(vocab, H, generator=g) * H**-0.5,
        ht=torch.randn(B, T, H, generator=g) * scale,
        wt=torch.randn(vocab, H, generator=g) * H**-0.5,
        tokens=torch.randint(0, vocab, (B, T), generator=g),
        mask=mask,
    )


@pytest.mark.parametrize("vocab", [300, ROW_DOT_LOOP_MIN_COLUMNS + 100])
@pytest.mark.parametrize("direction", ["fkl", "rkl"])
def test_full_kl_over_a_peaked_teacher_matches_float64_definition(vocab, direction):
    d = _peaked_batch(vocab)
    teacher_logp64 = torch.log_softmax((d["ht"] @ d["wt"].T).double(), -1)
    assert float(teacher_logp64.min()) < -300, "the teacher's log-probs reach far below the float32 floor"
    hs, ws = d["hs"].clone().requires_grad_(), d["ws"].clone().requires_grad_()
    objective = preset(direction, top_k=4, chunk_size=4)
    teacher = LinearLogits(d["ht"], d["wt"])
    out = objective(student=LinearLogits(hs, ws), tokens=d["tokens"], mask=d["mask"], teacher=teacher)
    g_h, g_w = torch.autograd.grad(out.loss, (hs, ws))

    ls = torch.log_softmax((hs @ ws.T).double(), -1)
    lt = teacher_logp64
    fkl, rkl = (lt.exp() * (lt - ls)).sum(-1), (ls.exp() * (ls - lt)).sum(-1)
    kl = fkl if direction == "fkl" else rkl
    ref = (kl * d["mask"]).sum() / d["mask"].sum()
    r_h, r_w = torch.autograd.grad(ref, (hs, ws))
    assert float(out.loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-5, abs=1e-6)
    # float32 sums over thousands of ids: within 1e-4 of the largest entry (AVX-512 kernels differ by 1e-5)
    torch.testing.assert_close(g_h, r_h.float(), rtol=1e-4, atol=1e-4 * float(r_h.abs().max()))
    torch.testing.assert_close(g_w, r_w.float(), rtol=1e-4, atol=1e-4 * float(r_w.abs().max()))
    metrics = out.metrics.means()
    m = d["mask"]
    for name, values in (("div/fkl", fkl), ("div/rkl", rkl), ("entropy/student", -(ls.exp() * ls).sum(-1))):
        assert metrics[name] == pytest.approx(float(values[m].mean().detach()), rel=1e-4, abs=1e-6), name


@pytest.mark.parametrize("vocab", [300, ROW_DOT_LOOP_MIN_COLUMNS + 100])
def test_eopd_from_statistics_of_a_peaked_teacher_matches_float64_definition(vocab):
    # Without full-vocabulary terms the tiles never form the student's log-probs in full: its entropy
    # and the ids read come from the shifted logits, and the gradient from the exp over them.
    d = _peaked_batch(vocab)
    hs, ws = d["hs"].clone().requires_grad_(), d["ws"].clone().requires_grad_()
    stats = teacher_token_stats(LinearLogits(d["ht"], d["wt"]), d["tokens"], k=4, chunk_size=5)
    objective = preset("eopd", top_k=4, chunk_size=4)
    out = objective(student=LinearLogits(hs, ws), tokens=d["tokens"], mask=d["mask"], teacher_stats=stats)
    g_h, g_w = torch.autograd.grad(out.loss, (hs, ws))

    ls = torch.log_softmax((hs @ ws.T).double(), -1)
    lt = torch.log_softmax((d["ht"] @ d["wt"].T).double(), -1)
    teacher_entropy = -(lt.exp() * lt).sum(-1)
    at_token = ls.gather(-1, d["tokens"][..., None])[..., 0]
    advantage = lt.gather(-1, d["tokens"][..., None])[..., 0] - at_token.detach()
    opd = -(at_token - at_token.detach()).exp() * advantage  # on-policy: the ratio is 1, never clipped
    top_t, top_i = lt.topk(4, -1)
    q = torch.softmax(top_t, -1)
    fkl = (q * (q.log() - ls.gather(-1, top_i))).sum(-1)
    per_token = opd + (teacher_entropy >= 0.8).double() * fkl
    m = d["mask"]
    assert 0 < int((teacher_entropy[m] >= 0.8).sum()) < int(m.sum()), "the gate opens on some tokens only"
    ref = (per_token * m).sum() / m.sum()
    r_h, r_w = torch.autograd.grad(ref, (hs, ws))
    assert float(out.loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(g_h, r_h.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_w, r_w.float(), rtol=1e-4, atol=1e-6)
    student_entropy = -(ls.exp() * ls).sum(-1)
    assert out.metrics.means()["entropy/student"] == pytest.approx(
        float(student_entropy[m].mean().detach()), rel=1e-5, abs=1e-6
    )


@pytest.mark.parametrize("vocab", [300, ROW_DOT_LOOP_MIN_COLUMNS + 100])
def test_teacher_statistics_of_a_peaked_teacher_match_float64(vocab):
    d = _peaked_batch(vocab)
    logits = d["ht"] @ d["wt"].T
    stats = teacher_token_stats(LinearLogits(d["ht"], d["wt"]), d["tokens"], k=4, chunk_size=5)
    lt = torch.log_softmax(logits.double(), -1)
    entropy = -(lt.exp() * lt).sum(-1)
    assert float(entropy.min()) < 1e-6 < 1.0 < float(entropy.max()), "confident and uncertain positions"
    torch.testing.assert_close(stats.entropy.double(), entropy, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        stats.token_logprobs.double(), lt.gather(-1, d["tokens"][..., None])[..., 0], rtol=1e-5, atol=1e-4
    )
    torch.testing.assert_close(stats.topk_logprobs.double(), lt.topk(4, -1).values, rtol=1e-5, atol=1e-4)
    assert torch.equal(stats.topk_indices, lt.topk(4, -1).indices)


def _assert_is_a_topk(x: torch.Tensor, k: int, values: torch.Tensor, indices: torch.Tensor) -> None:
    expected = x.topk(k, dim=-1)
    assert torch.equal(values, expected.values)  # the same values, sorted
    assert torch.equal(x.gather(-1, indices), values)  # and columns that hold them
    assert all(len(set(row)) == k for row in indices.tolist())  # k distinct columns per row


@pytest.mark.parametrize("columns", [TOPK_GROUPED_MIN_COLUMNS, TOPK_GROUPED_MIN_COLUMNS + 21, 151_936])
def test_topk_rows_is_torch_topk_at_a_large_vocabulary(columns):
    g = torch.Generator().manual_seed(columns)
    rows = 12
    x = torch.randn(rows, columns, generator=g) * torch.logspace(-1, 2, rows)[:, None]
    x[1, :] = -math.inf
    x[1, 5:40] = torch.randn(35, generator=g)  # only 35 finite values, a run of neighbouring columns
    x[2, -(columns % TOPK_GROUP_SIZE) - 40 :] += 1000.0  # the top ids at the end, in the ungrouped tail
    x[3, ::4748][:16] += 500.0  # the top ids in one strided group
    for k in (1, 4, 16, 63):
        values, indices = topk_rows(x, k)
        _assert_is_a_topk(x, k, values, indices)
        untied = values.isfinite().all(-1)  # random values do not tie; row 1's -inf do from k = 36
        assert torch.equal(indices[untied], x.topk(k, dim=-1).indices[untied])  # the same columns
    tied = x.bfloat16().float()  # bfloat16 keeps 8 bits: many equal values
    values, indices = topk_rows(tied, 16)
    _assert_is_a_topk(tied, 16, values, indices)
    peaked = x.double()
    _assert_is_a_topk(peaked, 16, *topk_rows(peaked, 16))
    # The groups read once serve the rows' maxima and the top-k of the rows shifted by them.
    finite = x[[0, 2, 3, 4]]
    groups = topk_groups(finite, 16)
    assert torch.equal(groups[1], finite.amax(dim=-1, keepdim=True))
    shifted = finite - groups[1]
    values, indices = topk_rows(shifted, 16, groups)
    _assert_is_a_topk(shifted, 16, values, indices)
    assert torch.equal(indices, topk_rows(finite, 16)[1])


def test_topk_rows_takes_torch_topk_where_the_grouping_does_not_pay():
    g = torch.Generator().manual_seed(0)
    narrow = torch.randn(5, 300, generator=g)
    assert [torch.equal(a, b) for a, b in zip(topk_rows(narrow, 7), narrow.topk(7, -1), strict=True)] == [
        True
    ] * 2
    wide = torch.randn(5, TOPK_GROUPED_MIN_COLUMNS, generator=g)
    for x, k in ((wide, 100), (wide.T.contiguous().T, 4), (wide.requires_grad_(), 4), (wide[:0], 4)):
        assert topk_groups(x, k) is None
        values, indices = topk_rows(x, k)
        assert torch.equal(values, x.topk(k, -1).values) and torch.equal(indices, x.topk(k, -1).indices)
