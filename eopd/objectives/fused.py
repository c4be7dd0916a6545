"""Memory-bounded losses over a large vocabulary: logits computed tile by tile over token positions.

At a 150k vocabulary the [tokens, vocab] logits (and their log-softmax and gradient) are the memory wall.
Here a model's side is either materialised logits (`Tensor`, shape (N, V)) or `LinearLogits`: the final
hidden states (N, H) and the output layer's weight (V, H), from which logits are formed one tile of
positions at a time, so that no full logits tensor ever exists.

Two engines:
  - `tiled_loss` for a scalar loss whose per-token coefficients are known up front (every objective in
    this package): each tile's gradient is computed in the forward pass and only grad(hidden) (N, H) and
    grad(weight) (V, H) are kept. Same matrix products as the naive path, one tile of logits in memory.
  - `per_token_fused` for any per-token function (each divergence of `divergences.py`): the output keeps
    its per-token shape and the tile's logits are recomputed in the backward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint


@dataclass
class LinearLogits:
    """Logits represented by final hidden states and an output layer, never materialised in full.

    Attributes:
        hidden: (..., H) hidden states after the final norm, i.e. the output layer's input.
        weight: (V_padded, H) output-layer weight (`model.get_output_embeddings().weight`).
        vocab_size: the shared vocabulary V <= V_padded; rows past it (padded embeddings) are ignored.
    """

    hidden: Tensor
    weight: Tensor
    vocab_size: int | None = None

    def __post_init__(self) -> None:
        if self.hidden.shape[-1] != self.weight.shape[-1]:
            raise ValueError(
                f"hidden size {self.hidden.shape[-1]} does not match the output weight {tuple(self.weight.shape)}"
                " (expected weight of shape (V, H))"
            )
        if self.vocab_size is None:
            self.vocab_size = self.weight.shape[0]
        if not 1 <= self.vocab_size <= self.weight.shape[0]:
            raise ValueError(
                f"vocab_size={self.vocab_size} must lie in [1, {self.weight.shape[0]}] (the weight's rows)"
            )
        if self.vocab_size < self.weight.shape[0]:
            # A view: its backward scatters into a zero (V_padded, H) tensor, so slice only when padded.
            self.weight = self.weight[: self.vocab_size]

    @property
    def shape(self) -> torch.Size:
        """The shape the logits would have: (..., V)."""
        return torch.Size((*self.hidden.shape[:-1], self.vocab_size))

    def rows(self, index: Tensor) -> LinearLogits:
        """The positions selected by a boolean mask over the leading dims, flattened: (N, H)."""
        return LinearLogits(self.hidden[index], self.weight, self.vocab_size)

    def logits(self, start: int = 0, end: int | None = None, out: Tensor | None = None) -> Tensor:
        """Float32 logits of rows [start, end) of a flat (N, H) hidden: (n, V), written into `out` (float32,
        (n, V)) when it is given."""
        hidden = self.hidden[start:end]
        if out is None:
            return (hidden @ self.weight.T).float()
        if hidden.dtype == self.weight.dtype == torch.float32:
            return torch.mm(hidden, self.weight.T, out=out)
        return out.copy_(hidden @ self.weight.T)


LogitSource = Tensor | LinearLogits


class TileBuffers:
    """Float32 (rows, V) buffers that each tile of one pass writes into, instead of fresh tensors.

    At a 150k vocabulary one tile's logits, log-probs or probabilities is 155 MB (256 rows). glibc serves
    a block that large with a fresh `mmap` and unmaps it on free, so a fresh tensor per tile is new memory
    that the kernel faults in and zeroes page by page, which took longer than the exp over it
    (docs/performance.md). A named buffer is allocated at the first tile (the largest) and its leading
    rows are handed to the later ones, so a pass pays that once. A view stays valid until its name (or
    the other name of its pair) is asked for again; the caller must be done with it by then.

    Args:
        pairs: second name -> first name: the two names' views are the halves of one allocation, the
            second's rows a fixed distance after the first's, which lets one batched product read a row
            of both (`tile_softmax.cross_dots`).
    """

    def __init__(self, pairs: Mapping[str, str] | None = None) -> None:
        self._buffers: dict[str, Tensor] = {}
        self._first_of = dict(pairs or {})

    def take(self, name: str, rows: int, columns: int, device: torch.device) -> Tensor:
        """A float32 (rows, columns) view of the buffer `name`, of unspecified contents."""
        key = self._first_of.get(name, name)
        halves = 2 if key in self._first_of.values() else 1
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape[1] < rows or buffer.shape[2] != columns or buffer.device != device:
            buffer = torch.empty((halves, rows, columns), dtype=torch.float32, device=device)
            self._buffers[key] = buffer
        return buffer[int(key != name), :rows]


def source_rows(source: LogitSource, index: Tensor) -> LogitSource:
    """Select positions of a logit source with a boolean mask over its leading dims -> (N, V) or (N, H)."""
    return source.rows(index) if isinstance(source, LinearLogits) else source[index]


def source_tile(
    source: LogitSource, start: int, end: int, buffers: TileBuffers | None = None, name: str = "logits"
) -> Tensor:
    """Float32 logits of rows [start, end) of a flat source: (n, V).

    With `buffers` the tile is written into the buffer `name` and the caller may overwrite it; without,
    materialised float32 logits come back as a view of the source.
    """
    if buffers is None:
        return source.logits(start, end) if isinstance(source, LinearLogits) else source[start:end].float()
    out = buffers.take(name, end - start, source.shape[-1], source_device(source))
    return (
        source.logits(start, end, out) if isinstance(source, LinearLogits) else out.copy_(source[start:end])
    )


def scaled_tile(
    source: LogitSource, start: int, end: int, temperature: float, buffers: TileBuffers, name: str = "logits"
) -> Tensor:
    """`source_tile` of rows [start, end) into the buffer `name`, divided by `temperature` in place."""
    logits = source_tile(source, start, end, buffers, name)
    return logits if temperature == 1.0 else logits.div_(temperature)


def source_device(source: LogitSource) -> torch.device:
    return source.hidden.device if isinstance(source, LinearLogits) else source.device


# Whole numbers just above the log of each dtype's smallest normal number (float32: -87.34, float64:
# -708.40): exp below those is subnormal or 0.
EXP_FLOOR = {torch.float32: -87.0, torch.float64: -708.0}
EXP_FLOOR_GLANCE = 256  # columns of each row that `exp_floored` reads first for a value below the floor


def exp_floored(x: Tensor, out: Tensor | None = None, floor: float | None = None) -> Tensor:
    """exp(x) with x first raised to `EXP_FLOOR[x.dtype]` (or to `floor` when it is given), written into
    `out` when it is given; x itself is left as it is.

    On the CPU torch's exp of a float32 below -87.3 (a subnormal or zero result) takes a slow path: a
    (256, 151,936) tile uniform in [-300, 0] took 659 ms against 42 ms with this floor (2 threads of
    an Intel Xeon; `scripts/bench_tile_kernels.py`), and a peaked teacher's log-probs go that low.
    Each such value comes out as exp(-87) = 1.6e-38 (float32) instead of a smaller one: an absolute
    change below that, lost in any float32 sum that holds a term near 1, and in any product with a
    finite log-prob. Other dtypes (float16's smallest normal is 6e-5) take the plain exp.

    On the CPU a tile with nothing below the floor (one read for its minimum) takes the plain exp, the
    same values without the clamp's extra pass over memory: 9 + 18 ms instead of 19 + 13 ms for a
    (256, 151,936) tile. A peaked tile, which has values below the floor in most rows, shows one in its
    first columns; only when those hold none is the whole tile read. Elsewhere the clamp always runs
    (the check would wait for the device).
    """
    if x.dtype not in EXP_FLOOR:
        return torch.exp(x, out=out)
    floor = EXP_FLOOR[x.dtype] if floor is None else floor
    if (
        x.device.type == "cpu"
        and x.numel() > 0
        and float(x[..., :EXP_FLOOR_GLANCE].amin()) >= floor
        and float(x.amin()) >= floor
    ):
        return torch.exp(x, out=out)
    return torch.clamp(x, min=floor, out=out).exp_()


def division_floor(x: Tensor) -> float | None:
    """A floor for exp(x) over rows of x's length V whose every value divided by a sum of at most V
    terms up to 1 is a normal number: EXP_FLOOR + ceil(log V). None for dtypes without a floor."""
    floor = EXP_FLOOR.get(x.dtype)
    return None if floor is None else floor + math.ceil(math.log(max(x.shape[-1], 1)))


# From this many columns one dot per row beats einsum's batched product (256 rows, 2 threads of an
# Intel Xeon: equal at 4,096 columns, 2.1 against 3.7 ms at 8,192, 3.8 against 6.1 ms at 16,384).
ROW_DOT_LOOP_MIN_COLUMNS = 8192


def row_dot(a: Tensor, b: Tensor) -> Tensor:
    """sum_v a[n, v] * b[n, v] for (n, V) tensors, with no (n, V) temporary: (n,).

    On the CPU at a large vocabulary this is one BLAS dot per row: einsum's batched product of (1, V)
    by (V, 1) took 61.5 ms for 256 x 151,936 where the dots took 16.3 ms
    (`scripts/bench_tile_kernels.py`). Elsewhere, and under autograd, einsum.
    """
    if (
        a.device.type == "cpu"
        and a.dim() == 2
        and a.shape[0] > 0
        and a.shape[-1] >= ROW_DOT_LOOP_MIN_COLUMNS
        and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad))
    ):
        return torch.stack([torch.dot(x, y) for x, y in zip(a, b, strict=True)])
    return torch.einsum("nv,nv->n", a, b)


# From this many columns `topk_rows` takes the top-k of candidate groups on the CPU (256 rows of 151,936:
# 81-96 ms for torch.topk, 15 ms grouped, AVX-512 kernels; about equal with the unvectorised ones).
TOPK_GROUPED_MIN_COLUMNS = 8192
TOPK_GROUP_SIZE = 32


def topk_groups(x: Tensor, k: int) -> tuple[Tensor, Tensor] | None:
    """The maxima of `topk_rows`'s column groups (n, G) and of the rows (n, 1), from one read of x; None
    where `topk_rows` takes torch.topk instead (off the CPU, a small vocabulary, a large k, a strided x,
    or under autograd)."""
    n, columns = x.shape[0], x.shape[-1]
    per = TOPK_GROUP_SIZE
    if (
        x.device.type != "cpu"
        or x.dim() != 2
        or n == 0
        or columns < TOPK_GROUPED_MIN_COLUMNS
        or 4 * k * per > columns
        or not x.is_contiguous()
        or (torch.is_grad_enabled() and x.requires_grad)
    ):
        return None
    groups = columns // per
    grouped = groups * per
    group_max = x[:, :grouped].view(n, per, groups).amax(dim=1)  # (n, G): column c is in group c mod G
    row_max = group_max.amax(dim=-1, keepdim=True)
    if grouped < columns:
        row_max = torch.maximum(row_max, x[:, grouped:].amax(dim=-1, keepdim=True))
    return group_max, row_max


def topk_rows(x: Tensor, k: int, groups: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """`x.topk(k, dim=-1)` of an (n, V) tensor: the k largest values of each row, sorted, and their columns.

    On the CPU at a large vocabulary, with nothing to differentiate, the first G * 32 columns form G
    groups of 32 (column c in group c mod G) and the k groups with the largest maxima, with the last
    V mod G columns, are the only candidates: every value outside them has k candidates (the chosen
    groups' maxima) at least as large, so the k largest candidates are the k largest values. torch.topk
    then runs over k * 32 + (V mod G) candidates instead of V. The values are torch.topk's; where values
    tie, the columns chosen among them may differ (torch.topk documents no order for ties either).

    Args:
        groups: `topk_groups` of x, or of x before a shift of each row by a constant (x - max): the
            shift keeps every order the argument above relies on. None reads them from x here.
    """
    groups = topk_groups(x, k) if groups is None else groups
    if groups is None:
        return x.topk(k, dim=-1)
    n, columns = x.shape[0], x.shape[-1]
    group_max = groups[0]
    grouped = group_max.shape[-1] * TOPK_GROUP_SIZE
    chosen = group_max.topk(k, dim=-1).indices  # (n, k)
    offsets = torch.arange(0, grouped, group_max.shape[-1], device=x.device)  # a group's columns: g + offsets
    candidates = (chosen[:, :, None] + offsets).reshape(n, k * TOPK_GROUP_SIZE)
    if grouped < columns:
        tail = torch.arange(grouped, columns, device=x.device).expand(n, columns - grouped)
        candidates = torch.cat([candidates, tail], dim=1)
    values, at = x.gather(1, candidates).topk(k, dim=-1)
    return values, candidates.gather(1, at)


def finite_at(values: Tensor, mask: Tensor) -> bool:
    """Whether values[mask] (mask over the leading dims) holds finite numbers only.

    First from the sums over the last dim, one read of `values` with no copy (a row with NaN or inf has
    a sum that is not finite); only where a sum is not finite, which a row of huge finite values can
    also give, the values themselves. On full (B, T, 151,936) logits the direct check copied the valid
    rows and made four passes over them.
    """
    if bool(torch.isfinite(values.sum(dim=-1)[mask]).all()):
        return True
    return bool(torch.isfinite(values[mask]).all())


def source_len(source: LogitSource) -> int:
    return source.hidden.shape[0] if isinstance(source, LinearLogits) else source.shape[0]


TileLoss = Callable[[Tensor, int, int], Tensor]
"""tile_fn(student_logits_tile (n, V) float32, start, end) -> scalar loss of that tile."""

TileValueAndGrad = Callable[[Tensor, int, int, bool], tuple[Tensor, Tensor | None]]
"""tile_fn(logits (n, V) float32, start, end, need_grad) -> (scalar loss, d loss / d logits or None).

The logits tile is the function's to overwrite (saving the memory of a second (n, V) tensor); it is a
buffer that the next tile reuses, so neither it nor a view of it may be kept past the call."""


def tiled_loss(
    student: LogitSource,
    tile_fn: TileLoss | TileValueAndGrad,
    *,
    chunk_size: int = 256,
    analytic_grad: bool = False,
    buffers: TileBuffers | None = None,
) -> Tensor:
    """Sum of `tile_fn` over tiles of `chunk_size` positions of a flat (N, ...) student source.

    The gradient with respect to the student's logits is taken tile by tile during the forward pass and
    pushed straight into the gradients of the hidden states and the output weight (or of the logits),
    so peak memory holds one tile of logits instead of all of them. `tile_fn` may close over any
    detached per-token data (teacher statistics, coefficients); only the student is differentiated.

    Args:
        analytic_grad: `tile_fn` is a `TileValueAndGrad` that returns its tile's gradient itself (cheaper
            when the caller knows it in closed form); otherwise autograd differentiates a `TileLoss`.
        buffers: where each tile's logits are written (the buffer "logits"), when the caller wants them
            beside buffers of its own (`TileBuffers` pairs); fresh ones otherwise.

    Returns:
        A 0-dim float32 tensor, differentiable with respect to the student's hidden states and weight (or
        logits).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive number of token positions")
    value_and_grad = tile_fn if analytic_grad else partial(_tile_value_and_grad, tile_fn)
    buffers = TileBuffers() if buffers is None else buffers
    if isinstance(student, LinearLogits):
        return _LinearTiledLoss.apply(student.hidden, student.weight, value_and_grad, chunk_size, buffers)
    return _LogitsTiledLoss.apply(student, value_and_grad, chunk_size, buffers)


def _tile_value_and_grad(tile_fn: TileLoss, logits: Tensor, start: int, end: int, need_grad: bool):
    with torch.enable_grad():
        logits = logits.detach().requires_grad_(need_grad)
        value = tile_fn(logits, start, end)
        if need_grad and value.requires_grad:
            (grad,) = torch.autograd.grad(value, logits)
        else:
            grad = torch.zeros_like(logits) if need_grad else None
    return value.detach(), grad


class _LinearTiledLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        value_and_grad: TileValueAndGrad,
        chunk_size: int,
        buffers: TileBuffers,
    ) -> Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_grad = need_h or need_w
        grad_hidden = torch.empty_like(hidden) if need_h else None  # every row is a tile's
        # Written by the first tile's product, not zeroed first: the fill alone is a pass over V x H floats
        # (216 ms of a 2,048 x 1,024 x 151,936 call, 2 threads). Zeros when there is no tile.
        make = torch.zeros if hidden.shape[0] == 0 else torch.empty
        grad_weight = make(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        source = LinearLogits(hidden, weight)
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            h = hidden[start:end]
            logits = source_tile(source, start, end, buffers)  # (n, V)
            value, grad = value_and_grad(logits, start, end, need_grad)
            total += value
            if need_grad:
                grad = grad.to(weight.dtype)
                if need_h:
                    grad_hidden[start:end] = grad @ weight  # (n, H)
                if need_w and start == 0:
                    torch.mm(grad.T.float(), h.float(), out=grad_weight)  # (V, H)
                elif need_w:
                    grad_weight.addmm_(grad.T.float(), h.float())
        # Kept as attributes, not saved tensors, so that backward can hand them over without a copy: a
        # second (V, H) weight gradient is the largest allocation this path would otherwise make.
        ctx.grads = [grad_hidden, grad_weight.to(weight.dtype) if need_w else None]
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        if ctx.grads is None:
            raise RuntimeError("tiled_loss supports one backward pass (no retain_graph=True through it)")
        grads, ctx.grads = ctx.grads, None
        if not bool(grad_output == 1):
            grads = [None if g is None else g * grad_output.to(g.dtype) for g in grads]
        return grads[0], grads[1], None, None, None


class _LogitsTiledLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, logits: Tensor, value_and_grad: TileValueAndGrad, chunk_size: int, buffers: TileBuffers
    ) -> Tensor:
        need_grad = ctx.needs_input_grad[0]
        grad_logits = torch.empty_like(logits) if need_grad else None  # every row is a tile's, no fill
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], chunk_size):
            end = min(start + chunk_size, logits.shape[0])
            tile = source_tile(logits, start, end, buffers)  # a copy: the tile function may overwrite it
            value, grad = value_and_grad(tile, start, end, need_grad)
            total += value
            if need_grad:
                grad_logits[start:end] = grad.to(logits.dtype)
        ctx.grads = [grad_logits]  # handed over in backward without a copy, as in _LinearTiledLoss
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        if ctx.grads is None:
            raise RuntimeError("tiled_loss supports one backward pass (no retain_graph=True through it)")
        (grad_logits,), ctx.grads = ctx.grads, None
        if grad_logits is not None and not bool(grad_output == 1):
            grad_logits = grad_logits * grad_output.to(grad_logits.dtype)
        return grad_logits, None, None, None


def per_token_fused(
    divergence: Callable[..., Tensor],
    student: LinearLogits,
    teacher: LogitSource,
    *,
    chunk_size: int = 256,
    **options,
) -> Tensor:
    """Any per-token divergence of (student_logits, teacher_logits) without full logits in memory.

    Args:
        divergence: a function of `divergences.py`, e.g. `forward_kl`.
        student: flat `LinearLogits` with hidden (N, H).
        teacher: flat `LinearLogits` with hidden (N, H_t), or teacher logits (N, V).
        chunk_size: positions per tile.
        **options: passed to `divergence` (temperature, beta, k, ...).

    Returns:
        (N,) per-token values, differentiable with respect to the student. Each tile's logits are
        recomputed in the backward pass (activation checkpointing per tile).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive number of token positions")
    n = source_len(student)
    if source_len(teacher) != n:
        raise ValueError(f"student has {n} positions but teacher has {source_len(teacher)}")

    def tile(h: Tensor, w: Tensor, t: Tensor | None, tw: Tensor | None, th: Tensor | None) -> Tensor:
        teacher_logits = t.float() if t is not None else (th @ tw.T).float()
        return divergence((h @ w.T).float(), teacher_logits, **options)

    outputs = []
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        if isinstance(teacher, LinearLogits):
            args = (
                student.hidden[start:end],
                student.weight,
                None,
                teacher.weight,
                teacher.hidden[start:end],
            )
        else:
            args = (student.hidden[start:end], student.weight, teacher[start:end], None, None)
        outputs.append(checkpoint(tile, *args, use_reentrant=False))
    return torch.cat(outputs) if outputs else student.hidden.new_zeros(0, dtype=torch.float32)


def detached(source: LogitSource) -> LogitSource:
    """The same logits with no gradient path back to the model."""
    if isinstance(source, LinearLogits):
        return LinearLogits(source.hidden.detach(), source.weight.detach(), source.vocab_size)
    return source.detach()
