"""Tiles write into buffers reused from tile to tile: nothing a tile leaves behind may read a reused buffer.

Each objective, run over many tiles of 3 positions (the last one shorter), must give the loss, the
gradients of the hidden states and the output weight, and every metric that one tile over all positions
gives; so must the teacher's statistics. A metric or statistic kept as a view of a tile's buffer would
be overwritten by the next tile and fail this.
"""

from __future__ import annotations

import math

import pytest
import torch

from eopd.objectives import LinearLogits, preset, teacher_token_stats
from eopd.objectives.fused import TileBuffers
from eopd.objectives.presets import PRESETS
from eopd.objectives.tile_softmax import log_softmax_and_exp_

B, T, H, V = 3, 7, 8, 29  # 21 positions, 17 valid: tiles of 3 leave a last tile of 2


def _batch(dtype=torch.float32):
    g = torch.Generator().manual_seed(5)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False
    return dict(
        hs=(torch.randn(B, T, H, generator=g) * 2).to(dtype),
        ws=torch.randn(V + 3, H, generator=g).to(dtype),  # 3 padded rows past the shared vocabulary
        ht=(torch.randn(B, T, H, generator=g) * 3).to(dtype),
        wt=torch.randn(V + 3, H, generator=g).to(dtype),
        tokens=torch.randint(0, V, (B, T), generator=g),
        mask=mask,
        old=torch.randn(B, T, generator=g) - 3.0,
        advantages=torch.randn(B, generator=g)[:, None].expand(B, T),
    )


def _run(name: str, chunk_size: int, batch: dict, temperature: float):
    hs = batch["hs"].clone().requires_grad_()
    ws = batch["ws"].clone().requires_grad_()
    teacher = LinearLogits(batch["ht"], batch["wt"], V)
    stats = teacher_token_stats(
        teacher, batch["tokens"], k=4, temperature=temperature, chunk_size=chunk_size, mask=batch["mask"]
    )
    objective = preset(name, top_k=4, chunk_size=chunk_size, temperature=temperature)
    out = objective(
        student=LinearLogits(hs, ws, V),
        tokens=batch["tokens"],
        mask=batch["mask"],
        teacher_stats=stats,
        teacher=teacher if objective.needs_teacher_logits else None,
        old_logprobs=batch["old"],
        advantages=batch["advantages"] if objective.needs_advantages else None,
    )
    out.loss.backward()
    return out.loss.detach(), hs.grad, ws.grad, out.metrics.means(), stats


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("name", PRESETS)
def test_many_tiles_equal_one_tile(name, temperature):
    batch = _batch()
    loss, grad_h, grad_w, metrics, stats = _run(name, 3, batch, temperature)
    loss1, grad_h1, grad_w1, metrics1, stats1 = _run(name, 10_000, batch, temperature)
    torch.testing.assert_close(loss, loss1, rtol=1e-5, atol=1e-6)
    # float32 sums over other tile shapes: within 1e-4 of the largest entry (AVX-512 kernels differ by 1e-5)
    torch.testing.assert_close(grad_h, grad_h1, rtol=1e-4, atol=1e-4 * float(grad_h1.abs().max()))
    torch.testing.assert_close(grad_w, grad_w1, rtol=1e-4, atol=1e-4 * float(grad_w1.abs().max()))
    assert metrics.keys() == metrics1.keys()
    for key, value in metrics1.items():
        assert metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-6, nan_ok=True), key
    for field in ("token_logprobs", "entropy", "topk_logprobs"):
        torch.testing.assert_close(getattr(stats, field), getattr(stats1, field), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.topk_indices, stats1.topk_indices)


def test_bfloat16_weights_tile_into_float32_buffers():
    batch = _batch(torch.bfloat16)
    loss, grad_h, grad_w, _, stats = _run("fkl", 3, batch, 1.0)
    loss1, grad_h1, grad_w1, _, stats1 = _run("fkl", 10_000, batch, 1.0)
    torch.testing.assert_close(loss, loss1, rtol=1e-5, atol=1e-6)
    assert grad_h.dtype == grad_w.dtype == torch.bfloat16
    torch.testing.assert_close(grad_w, grad_w1)
    torch.testing.assert_close(stats.entropy, stats1.entropy)


def test_a_buffer_is_reused_for_shorter_tiles_and_grows_for_longer_ones():
    buffers = TileBuffers()
    first = buffers.take("logits", 4, 10, torch.device("cpu"))
    shorter = buffers.take("logits", 2, 10, torch.device("cpu"))
    other = buffers.take("p", 4, 10, torch.device("cpu"))
    assert first.shape == (4, 10) and shorter.shape == (2, 10) and first.dtype == torch.float32
    assert shorter.data_ptr() == first.data_ptr()  # the same memory, from tile to tile
    assert other.data_ptr() != first.data_ptr()  # each name its own
    assert shorter.is_contiguous()
    longer = buffers.take("logits", 6, 10, torch.device("cpu"))
    assert longer.shape == (6, 10)
    assert buffers.take("logits", 6, 12, torch.device("cpu")).shape == (6, 12)  # another vocabulary


def test_log_softmax_in_place_matches_the_definition_and_torch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 1000, generator=g) * torch.tensor([0.1, 1.0, 10.0, 50.0, 3.0, 3.0])[:, None]
    logits[4, :500] = -math.inf  # masked ids
    logits[5, 7] = 80.0  # one dominant id
    reference = torch.log_softmax(logits.double(), dim=-1)
    scratch = torch.empty_like(logits)
    result, sums = log_softmax_and_exp_(logits.clone(), scratch=scratch)
    finite = reference.isfinite()
    assert torch.equal(result.isfinite(), finite)
    torch.testing.assert_close(result[finite].double(), reference[finite], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(result, torch.log_softmax(logits, dim=-1), rtol=1e-6, atol=1e-5)
    # What it leaves in the scratch is exp(logits - max), with the row sums it returns: p = e / s.
    p = scratch / sums
    torch.testing.assert_close(p[finite].double(), reference.exp()[finite], rtol=1e-5, atol=1e-12)
    assert torch.equal(log_softmax_and_exp_(logits.clone(), scratch=scratch)[0], result)


def test_log_softmax_in_place_keeps_float32_resolution_near_zero_at_a_large_logit_scale():
    # The largest log-probs of a confident row are near 0: shifting by the max first keeps the float32
    # resolution there (about 1e-7) instead of that of the logits' magnitude (ulp(150) = 1.5e-5), which
    # logits - logsumexp(logits) would leave.
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 5000, generator=g) + 150.0
    logits[:, 0], logits[:, 1] = 160.0, 159.5  # two ids hold nearly all the mass: log-probs -0.68, -1.18
    reference = torch.log_softmax(logits.double(), dim=-1)
    result, _ = log_softmax_and_exp_(logits.clone(), scratch=torch.empty_like(logits))
    assert float((result[:, :2].double() - reference[:, :2]).abs().max()) < 1e-6  # logsumexp's form: 7e-6
    torch.testing.assert_close(result.double(), reference, rtol=1e-6, atol=2e-6)


@pytest.mark.parametrize("name", ["eopd", "fkl"])
def test_the_weight_gradient_is_written_by_the_first_tile_and_zero_without_one(name):
    # The output weight's gradient is not zeroed before the tiles: the first tile's product writes it.
    # With no valid position there is no tile, and the gradient must still be zeros, not whatever the
    # allocator hands back (made likely here by freeing a NaN-filled tensor of the same shape first).
    batch = _batch()
    for mask in (batch["mask"], torch.zeros_like(batch["mask"])):
        stale = torch.full_like(batch["ws"], math.nan)
        del stale
        _, grad_h, grad_w, _, _ = _run(name, 3, dict(batch, mask=mask), 1.0)
        assert torch.isfinite(grad_w).all() and torch.isfinite(grad_h).all()
        if not mask.any():
            assert grad_w.abs().max() == 0 and grad_h.abs().max() == 0
