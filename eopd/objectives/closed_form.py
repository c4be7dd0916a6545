"""The closed-form path of an objective: a tile's loss and its gradient with respect to the logits, formed
without autograd through the full-vocabulary softmax (for objectives whose terms all have closed forms)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from eopd.objectives.diagnostics import student_metrics
from eopd.objectives.fused import TileBuffers
from eopd.objectives.reduction import Metrics
from eopd.objectives.terms import Term, Tile
from eopd.objectives.tile_softmax import exact_kls, softmaxed


def loss_and_grad(
    terms: Sequence[Term],
    temperature: float,
    diagnostic_tau: float,
    logits: Tensor,
    tile: Tile,
    coefficients: Tensor,
    count: float,
    metrics: Metrics,
    keep: Callable[[dict[str, Tensor]], None],
    need_grad: bool,
    token_logp_out: Tensor | None = None,
    *,
    buffers: TileBuffers,
) -> tuple[Tensor, Tensor | None]:
    """One tile's loss and d loss / d logits in closed form, for objectives of closed-form terms only.

    With log p = log_softmax(z / T) and G = d L / d log p, the chain rule through the softmax gives
        d L / d z = (G - p * sum_v G_v) / T.
    Sparse terms contribute G on their supports only (the sampled token, the teacher's top-k), dense
    ones (`TermKind.dense`: full-vocabulary KL, entropy) a full row each that sums to 0, so that
    sum_v G_v is the sparse terms' alone; either way the full-vocabulary work is an exp shared with the
    diagnostics and a few fused row operations: no autograd graph over (n, V) tensors.

    Args:
        logits: (n, V) float32 student logits of the tile; overwritten with logits - max.
        tile: its `teacher` (`Softmaxed`) when the objective has the teacher's logits.
        coefficients: (n_terms, n) weight x gate / N_valid per term and token.
        keep: receives the per-token values of the diagnostics (for the gates and their metrics).
        buffers: where the student's exp is written (the buffer "p", reused from tile to tile); the
            returned gradient is built in its memory, or with dense terms in the memory of theirs.
    """
    # In place: at a 150k vocabulary each (n, V) float32 tensor is what bounds the chunk size.
    z = logits if temperature == 1.0 else logits.div_(temperature)
    # z - max in z's memory, e = exp(z - max) in the buffer "p", their row sums s: log p and p are never
    # formed in full, only at the few ids read and inside the row operations that read them.
    student = softmaxed(z, buffers.take("p", *z.shape, z.device))
    kls = None
    if tile.teacher is not None:  # the exact KLs and the student's entropy from one batched product
        student_entropy, fkl, rkl = exact_kls(student, tile.teacher)
        kls = (fkl, rkl)
    else:
        student_entropy = student.entropy()
    token_logp = student.log_probs_at(tile.tokens[:, None]).squeeze(-1)
    if token_logp_out is not None:
        token_logp_out.copy_(token_logp)
    if tile.old_logprobs is None:
        tile.old_logprobs = token_logp
    # Diagnostics first: the last dense term may build its gradient in the teacher's tensors. The exact
    # KLs and the entropy they log are the dense terms' values.
    tile.known = student_metrics(
        metrics,
        None,
        token_logp,
        tile,
        student_entropy=student_entropy,
        topk_logp=student.log_probs_at(tile.stats.topk_indices),
        kls=kls,
        terms=terms,
        diagnostic_tau=diagnostic_tau,
    )
    keep(tile.known)
    total = z.new_zeros(())
    supports, grads = [], []
    with torch.enable_grad():
        for i, term in enumerate(terms):
            if not term.sparse:
                continue
            support = term.spec.support(tile, term.options)  # (n, m)
            at = student.log_probs_at(support).requires_grad_(need_grad)
            values = term.spec.gathered(at, tile, term.options)
            term_total = (coefficients[i] * values).sum()
            metrics.add(f"loss/{term.name}", (coefficients[i] * count) * values.detach())
            total = total + term_total.detach()
            if need_grad:
                (grad_at,) = torch.autograd.grad(term_total, at)
                supports.append(support)
                grads.append(grad_at)
    dense = [i for i, term in enumerate(terms) if not term.sparse]
    dense_grad = None  # (n, V): sum over dense terms of coefficient x G
    for i in dense:
        term = terms[i]
        scale = coefficients[i] if need_grad else None
        values, g = term.spec.dense(student, tile, term.options, scale, i == dense[-1])
        metrics.add(f"loss/{term.name}", (coefficients[i] * count) * values)
        total = total + (coefficients[i] * values).sum()
        if need_grad:
            dense_grad = g if dense_grad is None else dense_grad.add_(g)
    if not need_grad:
        return total, None
    grad_sum = sum(g.sum(-1) for g in grads) if grads else z.new_zeros(z.shape[0])  # (n,)
    # -p * sum_v G_v = e * (-sum_v G_v / s), the sparse terms' G alone (a dense term's sums to 0)
    sparse_scale = grad_sum.div(student.sums.squeeze(-1)).neg_()[:, None]
    if dense_grad is None:  # in e's memory
        grad = student.e.mul_(sparse_scale)
    elif grads:
        grad = dense_grad.addcmul_(student.e, sparse_scale)
    else:
        grad = dense_grad
    for support, grad_at in zip(supports, grads, strict=True):
        grad.scatter_add_(-1, support, grad_at)
    if temperature != 1.0:
        grad.div_(temperature)
    return total, grad
