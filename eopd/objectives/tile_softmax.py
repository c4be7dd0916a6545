"""One tile's softmax over the vocabulary: log p and p formed in place, or kept unnormalised.

A tile of logits z (n, V) becomes z - max, e = exp(z - max) and the row sums s (`shifted_exp_`), from which
log p = (z - max) - log s and p = e / s. The autograd path forms both in full (`tile_distribution`); the
closed-form path keeps the unnormalised pair (`Softmaxed`) and reads every sum over the vocabulary it
needs from four row-wise dots of the student's and the teacher's (`exact_kls`), which saves a pass over
the tile for each of log p and p per model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from eopd.objectives.fused import LogitSource, TileBuffers, division_floor, exp_floored, row_dot, scaled_tile


def shifted_exp_(logits: Tensor, scratch: Tensor, maxes: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """logits - max per row, in place, and e = exp(logits - max) in `scratch` (the same shape), with its
    row sums s (n, 1): log p = (logits - max) - log s, p = e / s. Infinite maxima are taken as 0;
    `maxes` (n, 1) are the row maxima when the caller has them (`topk_groups` reads them).

    The shift by the max keeps float32's resolution where it matters: the largest log-probs come out
    near 0 with the resolution there, not that of the logits' magnitude, which logits - logsumexp
    leaves. The exp is `exp_floored` at `division_floor` (EXP_FLOOR plus the log of the row's length,
    -75 for a 151,936-id float32 row), so that e / s is never subnormal either: the floored values, at
    most 2.7e-33 (float32) where the exact ones are smaller, add at most V * 2.7e-33 = 4e-28 to a sum
    whose largest term is 1.
    """
    maxes = logits.amax(dim=-1, keepdim=True) if maxes is None else maxes.clone()
    maxes.masked_fill_(maxes.abs() == math.inf, 0.0)
    shifted = logits.sub_(maxes)
    sums = exp_floored(shifted, out=scratch, floor=division_floor(shifted)).sum(dim=-1, keepdim=True)
    return shifted, sums


def shifted_entropy(shifted: Tensor, e: Tensor, sums: Tensor) -> Tensor:
    """-sum p log p per row (n,) from `shifted_exp_`'s results: log s - sum(e (z - max)) / s."""
    return torch.log(sums).squeeze(-1) - row_dot(e, shifted) / sums.squeeze(-1)


def log_softmax_and_exp_(logits: Tensor, scratch: Tensor) -> tuple[Tensor, Tensor]:
    """log_softmax of logits, in place, and the row sums s (n, 1) of e = exp(logits - max), which it
    leaves in `scratch`: `shifted_exp_` and one more pass for log p = (logits - max) - log s."""
    shifted, sums = shifted_exp_(logits, scratch)
    return shifted.sub_(torch.log(sums)), sums


def log_softmax_and_softmax_(logits: Tensor, scratch: Tensor) -> tuple[Tensor, Tensor]:
    """log_softmax of logits (in place) and the probabilities e / s (in `scratch`): (n, V) each.

    The probabilities come from the exp that the log-softmax's sum already took, by one division per
    value, not from a second exp of the log-probs (exp(log p) also carries the rounding of
    log p = (z - max) - log s into p, about |log p| units in the last place)."""
    logp, sums = log_softmax_and_exp_(logits, scratch)
    return logp, scratch.div_(sums)


def tile_distribution(
    source: LogitSource, start: int, end: int, temperature: float, buffers: TileBuffers, prefix: str = ""
) -> tuple[Tensor, Tensor]:
    """log_softmax and softmax of logits / temperature for rows [start, end) of a flat source: (n, V)
    each, the log-probs in the buffer `prefix + "logits"` and the probabilities in `prefix + "p"`
    (`log_softmax_and_softmax_`)."""
    logits = scaled_tile(source, start, end, temperature, buffers, prefix + "logits")
    return log_softmax_and_softmax_(logits, buffers.take(prefix + "p", *logits.shape, logits.device))


@dataclass
class Softmaxed:
    """softmax(z) of one tile, unnormalised: `shifted` = z - max (n, V), `e` = exp(shifted) (n, V),
    floored as `shifted_exp_` floors it, and `sums` = sum_v e (n, 1); log p = shifted - log s, p = e / s."""

    shifted: Tensor
    e: Tensor
    sums: Tensor

    @cached_property
    def log_sums(self) -> Tensor:
        """log s per row: (n,); taken once, as the log-probs, the KLs and the gradients each read it."""
        return torch.log(self.sums).squeeze(-1)

    def log_probs_at(self, index: Tensor) -> Tensor:
        """log p at the ids `index` (n, m): (n, m)."""
        return self.shifted.gather(-1, index) - self.log_sums[:, None]

    def entropy(self) -> Tensor:
        """-sum p log p per row: (n,)."""
        return shifted_entropy(self.shifted, self.e, self.sums)


def softmaxed(
    logits: Tensor, scratch: Tensor, maxes: Tensor | None = None, peak_ids: Tensor | None = None
) -> Softmaxed:
    """`shifted_exp_` of a tile of logits (overwritten with z - max), e in `scratch`; `maxes` (n, 1) the
    rows' maxima when the caller has them.

    `peak_ids` (n, 1) are the ids where the rows' maxima are expected, e.g. a teacher's top-1 from its
    statistics. On the CPU the shift is then read there, one gather instead of a pass over the tile
    (23-25 ms of a (256, 151,936) tile unvectorised, 9 ms with AVX-512; `scripts/bench_tile_kernels.py`).
    The shift need not be the exact maximum, only its value at some id; a row whose id was not its peak
    shows it in its sum: every exp(z - z[id]) at most 1 gives s <= V. A tile where a sum is above V (or
    not a number) is shifted again by its maxima, which leaves z - max and e as if `maxes` had been read.
    """
    if maxes is None and peak_ids is not None and logits.device.type == "cpu":
        shifted, sums = shifted_exp_(logits, scratch, logits.gather(-1, peak_ids))
        if not bool((sums <= logits.shape[-1]).all()):  # also False for NaN
            shifted, sums = shifted_exp_(shifted, scratch)
    else:
        shifted, sums = shifted_exp_(logits, scratch, maxes)
    return Softmaxed(shifted, scratch, sums)


def softmaxed_tile(
    source: LogitSource,
    start: int,
    end: int,
    temperature: float,
    buffers: TileBuffers,
    prefix: str = "",
    peak_ids: Tensor | None = None,
) -> Softmaxed:
    """`softmaxed` of logits / temperature for rows [start, end) of a flat source, z - max in the buffer
    `prefix + "logits"` and e in `prefix + "p"`; `peak_ids` (n, 1) as `softmaxed` takes them."""
    logits = scaled_tile(source, start, end, temperature, buffers, prefix + "logits")
    return softmaxed(logits, buffers.take(prefix + "p", *logits.shape, logits.device), peak_ids=peak_ids)


def pair_view(first: Tensor, second: Tensor) -> Tensor | None:
    """The (n, 2, V) view whose [:, 0] is `first` and [:, 1] is `second`, for two contiguous (n, V) tensors
    that lie in one allocation, `second` after `first` (the halves of a `TileBuffers` pair); else None."""
    offset = second.storage_offset() - first.storage_offset()
    if (
        first.dim() != 2
        or first.shape != second.shape
        or first.dtype != second.dtype
        or not (first.is_contiguous() and second.is_contiguous())
        or first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr()
        or offset <= 0
    ):
        return None
    n, columns = first.shape
    return first.as_strided((n, 2, columns), (columns, offset, 1))


def cross_dots(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> Tensor:
    """d[:, i, j] = sum_v a[i][:, v] * b[j][:, v] for four (n, V) tensors: (n, 2, 2).

    When each pair is the two halves of one allocation (`pair_view`) this is one batched product of
    (n, 2, V) by (n, V, 2), which reads each tensor once: 26-29 ms against 67-73 ms for four `row_dot`s
    at (256, 151,936), 2 threads of an Intel Xeon, under both kernel sets (`scripts/bench_tile_kernels.py`).
    Otherwise, and under autograd, the four `row_dot`s.
    """
    pair_a, pair_b = pair_view(*a), pair_view(*b)
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (*a, *b))
    if pair_a is not None and pair_b is not None and not grad:
        return torch.bmm(pair_a, pair_b.transpose(1, 2))
    return torch.stack([torch.stack([row_dot(x, y) for y in b], dim=-1) for x in a], dim=1)


# From this many values per tile `pair_combination` takes the batched product: below it, at (32, 8,192) or
# (8, 32,768) say, that path's fixed cost (about 40 us: the weights' stack, the pair's checks) outweighs
# the pass it saves (AVX-512 kernels, 2 threads of an Intel Xeon; `scripts/bench_tile_kernels.py`).
PAIR_COMBINATION_MIN_VALUES = 1 << 20


def pair_combination(
    first: Tensor, second: Tensor, a: Tensor, b: Tensor, out: Tensor | None = None
) -> Tensor:
    """a[:, None] * first + b[:, None] * second for two (n, V) tensors and weights a, b (n,): (n, V), in
    `out` when it is given (which must not be `first`).

    When the two are the halves of one allocation (`pair_view`) of at least `PAIR_COMBINATION_MIN_VALUES`
    each, this is one batched product of (n, 1, 2) by (n, 2, V), which reads each once and writes the
    result once: 24-25 ms against 34-53 ms for a multiply and an addcmul at (256, 151,936), 2 threads of
    an Intel Xeon, both kernel sets (`scripts/bench_tile_kernels.py`). Otherwise, and under autograd,
    that multiply and addcmul.
    """
    pair = pair_view(first, second) if first.numel() >= PAIR_COMBINATION_MIN_VALUES else None
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (first, second, a, b))
    if pair is not None and not grad and out is not first and out is not second:
        weights = torch.stack([a, b], dim=-1).to(pair.dtype)[:, None, :]  # (n, 1, 2)
        n, columns = first.shape
        result = torch.bmm(weights, pair, out=None if out is None else out.view(n, 1, columns))
        return result.view(n, columns)
    return torch.mul(second, b[:, None], out=out).addcmul_(first, a[:, None])


def exact_kls(student: Softmaxed, teacher: Softmaxed) -> tuple[Tensor, Tensor, Tensor]:
    """The student's entropy, KL(teacher || student) and KL(student || teacher) per row (n,) each, from
    the dots of e_s, e_t with z_s - max_s, z_t - max_t (`cross_dots`) and the row sums: with
    log p = shifted - log s and sum_v p = 1, sum_v p_a log p_b = (e_a . shifted_b) / s_a - log s_b."""
    d = cross_dots((student.e, teacher.e), (student.shifted, teacher.shifted))
    s_s, s_t = student.sums.squeeze(-1), teacher.sums.squeeze(-1)
    log_s, log_t = student.log_sums, teacher.log_sums
    entropy = log_s - d[:, 0, 0] / s_s
    forward = (d[:, 1, 1] - d[:, 1, 0]) / s_t - log_t + log_s
    reverse = (d[:, 0, 0] - d[:, 0, 1]) / s_s - log_s + log_t
    return entropy, forward, reverse
