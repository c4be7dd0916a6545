"""A tile's softmax kept unnormalised, and the four row-wise sums the closed-form path reads from it.

The closed-form path forms neither log p nor p in full: the student's entropy and both exact KLs come
from the dots of exp(z - max) with z - max of the student and the teacher, one batched product when the
two models' tiles are the halves of one `TileBuffers` pair. Each is checked against the float64
definition, on a teacher whose log-probs reach hundreds of nats below its top id.
"""

from __future__ import annotations

import pytest
import torch

from eopd.objectives import LinearLogits, preset, teacher_token_stats
from eopd.objectives import tile_softmax as ts
from eopd.objectives.fused import ROW_DOT_LOOP_MIN_COLUMNS, TileBuffers

CPU = torch.device("cpu")


def test_a_pair_of_names_is_two_halves_of_one_allocation_for_every_tile():
    buffers = TileBuffers(pairs={"teacher_logits": "logits"})
    for rows in (4, 3):  # the first tile, then a shorter last one
        first = buffers.take("logits", rows, 10, CPU)
        second = buffers.take("teacher_logits", rows, 10, CPU)
        assert first.shape == second.shape == (rows, 10) and first.is_contiguous() and second.is_contiguous()
        assert first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()
        first.copy_(torch.arange(rows * 10.0).reshape(rows, 10))
        second.copy_(-first)
        both = ts.pair_view(first, second)
        assert both.shape == (rows, 2, 10)
        assert torch.equal(both[:, 0], first) and torch.equal(both[:, 1], second)
    assert buffers.take("p", 4, 10, CPU).untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
    assert ts.pair_view(second, first) is None  # the second half first: no view with a positive stride
    assert ts.pair_view(first, torch.zeros_like(first)) is None  # two allocations


def _pairs(columns: int, paired: bool):
    g = torch.Generator().manual_seed(0)
    values = [torch.randn(5, columns, generator=g) for _ in range(4)]
    if not paired:
        return values
    a, b = TileBuffers(pairs={"a1": "a0"}), TileBuffers(pairs={"b1": "b0"})
    names = ((a, "a0"), (a, "a1"), (b, "b0"), (b, "b1"))
    return [
        buffers.take(name, 5, columns, CPU).copy_(x) for (buffers, name), x in zip(names, values, strict=True)
    ]


@pytest.mark.parametrize("columns", [300, ROW_DOT_LOOP_MIN_COLUMNS + 100])
@pytest.mark.parametrize("paired", [True, False])
def test_cross_dots_are_the_four_row_wise_sums_of_products(columns, paired):
    a0, a1, b0, b1 = _pairs(columns, paired)
    assert (ts.pair_view(a0, a1) is not None) == paired  # the batched product, or the row dots
    d = ts.cross_dots((a0, a1), (b0, b1))
    assert d.shape == (5, 2, 2)
    for i, x in enumerate((a0, a1)):
        for j, y in enumerate((b0, b1)):
            reference = (x.double() * y.double()).sum(-1)
            torch.testing.assert_close(d[:, i, j].double(), reference, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("columns", [300, ROW_DOT_LOOP_MIN_COLUMNS + 100])
@pytest.mark.parametrize("paired", [True, False])
def test_exact_kls_and_entropy_match_float64_definitions(columns, paired):
    g = torch.Generator().manual_seed(1)
    rows = 6
    scale = torch.tensor([1.0, 5.0, 20.0, 60.0, 60.0, 3.0])[:, None]  # mild to very peaked teachers
    z_s, z_t = torch.randn(rows, columns, generator=g) * 2, torch.randn(rows, columns, generator=g) * scale
    ls, lt = torch.log_softmax(z_s.double(), -1), torch.log_softmax(z_t.double(), -1)
    assert float(lt.min()) < -300, "the teacher's log-probs reach far below the float32 floor"
    buffers = TileBuffers(pairs={"teacher_logits": "logits", "teacher_p": "p"} if paired else None)
    tiles = []
    for prefix, z in (("", z_s), ("teacher_", z_t)):
        logits = buffers.take(prefix + "logits", rows, columns, CPU).copy_(z)
        tiles.append(ts.softmaxed(logits, buffers.take(prefix + "p", rows, columns, CPU)))
    entropy, fkl, rkl = ts.exact_kls(*tiles)
    torch.testing.assert_close(entropy.double(), -(ls.exp() * ls).sum(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fkl.double(), (lt.exp() * (lt - ls)).sum(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rkl.double(), (ls.exp() * (ls - lt)).sum(-1), rtol=1e-5, atol=1e-5)
    student = tiles[0]
    torch.testing.assert_close(student.entropy(), entropy, rtol=1e-5, atol=1e-6)
    at = torch.randint(0, columns, (rows, 3), generator=g)
    torch.testing.assert_close(student.log_probs_at(at).double(), ls.gather(-1, at), rtol=1e-6, atol=1e-5)


def test_the_objective_reads_its_full_vocabulary_sums_from_one_batched_product(monkeypatch):
    # The student's tile and the teacher's are halves of one allocation: every exact KL and the
    # student's entropy come from the batched product, never from the row-dot fallback, and so does
    # the forward KL's gradient.
    g = torch.Generator().manual_seed(2)
    hs, ws = torch.randn(2, 5, 8, generator=g).requires_grad_(), torch.randn(40, 8, generator=g)
    teacher = LinearLogits(torch.randn(2, 5, 8, generator=g) * 4, torch.randn(40, 8, generator=g))
    tokens, mask = torch.randint(0, 40, (2, 5), generator=g), torch.ones(2, 5, dtype=torch.bool)
    stats = teacher_token_stats(teacher, tokens, k=4, chunk_size=3)

    def no_row_dot(*args):
        raise AssertionError("a row-dot fallback ran")

    class NoMultiply:  # torch, but for the forward KL gradient's multiply-and-addcmul fallback
        def __getattr__(self, name):
            if name == "mul":
                raise AssertionError("the gradient's multiply-and-addcmul fallback ran")
            return getattr(torch, name)

    def run(name):
        student = hs.detach().clone().requires_grad_()
        out = preset(name, top_k=4, chunk_size=3)(
            student=LinearLogits(student, ws), tokens=tokens, mask=mask, teacher_stats=stats, teacher=teacher
        )
        out.loss.backward()
        return out.loss.detach(), student.grad, out.metrics.means()

    # What the small tiles compute without the batched paths (their fallbacks, checked against float64
    # elsewhere), then with them forced.
    expected = {name: run(name) for name in ("fkl", "rkl")}
    monkeypatch.setattr(ts, "row_dot", no_row_dot)
    monkeypatch.setattr(ts, "torch", NoMultiply())
    monkeypatch.setattr(ts, "PAIR_COMBINATION_MIN_VALUES", 0)  # these tiles are small
    for name, (loss, grad, metrics) in expected.items():
        got_loss, got_grad, got_metrics = run(name)
        torch.testing.assert_close(got_loss, loss)
        torch.testing.assert_close(got_grad, grad)
        assert (
            got_metrics["div/fkl"] == pytest.approx(metrics["div/fkl"], rel=1e-5) and metrics["div/fkl"] > 0
        )


@pytest.mark.parametrize("batched_from", [0, ts.PAIR_COMBINATION_MIN_VALUES])  # batched, then too small
@pytest.mark.parametrize("paired", [True, False])
def test_pair_combination_is_the_row_weighted_sum_of_the_two_tiles(paired, batched_from, monkeypatch):
    monkeypatch.setattr(ts, "PAIR_COMBINATION_MIN_VALUES", batched_from)
    first, second, out, _ = _pairs(ROW_DOT_LOOP_MIN_COLUMNS + 100, paired)
    g = torch.Generator().manual_seed(3)
    a, b = torch.rand(5, generator=g), -torch.rand(5, generator=g)
    reference = a[:, None].double() * first.double() + b[:, None].double() * second.double()
    torch.testing.assert_close(ts.pair_combination(first, second, a, b).double(), reference)
    result = ts.pair_combination(first, second, a, b, out=out)
    assert result.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out.double(), reference)
    # Into the second tile's own memory (the fallback's in-place form).
    torch.testing.assert_close(ts.pair_combination(first, second, a, b, out=second).double(), reference)


def test_the_peak_ids_shift_is_the_maxima_and_a_wrong_id_is_shifted_again():
    g = torch.Generator().manual_seed(4)
    rows, columns = 6, 9000
    z = torch.randn(rows, columns, generator=g) * torch.tensor([1.0, 5.0, 20.0, 60.0, 60.0, 3.0])[:, None]
    expected = ts.softmaxed(z.clone(), torch.empty_like(z))
    peaks = z.argmax(-1, keepdim=True)
    for ids in (peaks, (peaks + 1) % columns, torch.zeros_like(peaks)):  # the peaks, then wrong ids
        got = ts.softmaxed(z.clone(), torch.empty_like(z), peak_ids=ids)
        assert float(got.shifted.amax()) == 0.0 and bool((got.sums <= columns).all())
        torch.testing.assert_close(got.shifted, expected.shifted, rtol=0, atol=1e-4)
        torch.testing.assert_close(got.sums, expected.sums)
        torch.testing.assert_close(got.entropy(), expected.entropy(), rtol=1e-5, atol=1e-5)
    exact = ts.softmaxed(z.clone(), torch.empty_like(z), peak_ids=peaks)
    assert torch.equal(exact.shifted, expected.shifted) and torch.equal(exact.sums, expected.sums)
