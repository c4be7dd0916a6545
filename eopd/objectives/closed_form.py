"""The closed-form path of an objective: a tile's loss and its gradient with respect to the logits, formed
without autograd through the full-vocabulary softmax (for objectives whose terms all have closed forms)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from eopd.objectives.diagnostics import student_metrics
from eopd.objectives.fused import TileBuffers, row_dot, shifted_entropy, shifted_exp_
from eopd.objectives.reduction import Metrics
from eopd.objectives.terms import Term, Tile


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
        logits: (n, V) float32 student logits of the tile; overwritten (with the log-probs, or without
            dense terms and teacher logits with logits - max, from which the few ids read are gathered).
        coefficients: (n_terms, n) weight x gate / N_valid per term and token.
        keep: receives the per-token values of the diagnostics (for the gates and their metrics).
        buffers: where the student's probabilities are written (reused from tile to tile); the returned
            gradient is built in their memory, or with dense terms in the memory of the dense gradient.
    """
    # In place: at a 150k vocabulary each (n, V) float32 tensor is what bounds the chunk size.
    z = logits if temperature == 1.0 else logits.div_(temperature)
    e = buffers.take("p", *z.shape, z.device)
    shifted, sums = shifted_exp_(z, scratch=e)  # z - max and e = exp(z - max): (n, V) each; s (n, 1)
    log_sums = torch.log(sums)
    dense = [i for i, term in enumerate(terms) if not term.sparse]
    if dense:  # full-vocabulary terms read log p and p in full
        logp, p = shifted.sub_(log_sums), e.div_(sums)
        student_entropy = -row_dot(p, logp)
    else:  # p = e / s only inside the few row operations that read it, the gradient's among them
        p = None
        student_entropy = shifted_entropy(shifted, e, sums)
        # log p = (z - max) - log s in full only for the exact KLs to the teacher's full distribution;
        # otherwise it is formed at the few ids read.
        logp = shifted.sub_(log_sums) if tile.teacher_logp is not None else None

    def log_probs_at(index: Tensor) -> Tensor:
        return shifted.gather(-1, index) - log_sums if logp is None else logp.gather(-1, index)

    token_logp = log_probs_at(tile.tokens[:, None]).squeeze(-1)
    if token_logp_out is not None:
        token_logp_out.copy_(token_logp)
    if tile.old_logprobs is None:
        tile.old_logprobs = token_logp
    # Diagnostics first: the last dense term may build its gradient in the teacher's tensors. The exact
    # KLs they compute are the dense KL terms' values, by the same expressions: those terms reuse them.
    tile.known = student_metrics(
        metrics,
        logp,
        token_logp,
        tile,
        student_entropy=student_entropy,
        student_p=e if p is None else p,
        student_sums=sums if p is None else None,
        topk_logp=log_probs_at(tile.stats.topk_indices),
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
            at = log_probs_at(support).requires_grad_(need_grad)
            values = term.spec.gathered(at, tile, term.options)
            term_total = (coefficients[i] * values).sum()
            metrics.add(f"loss/{term.name}", (coefficients[i] * count) * values.detach())
            total = total + term_total.detach()
            if need_grad:
                (grad_at,) = torch.autograd.grad(term_total, at)
                supports.append(support)
                grads.append(grad_at)
    dense_grad = None  # (n, V): sum over dense terms of coefficient x G
    for i in dense:
        term = terms[i]
        consume = i == dense[-1]
        values, g = term.spec.dense(logp, p, tile, term.options, need_grad, consume)
        metrics.add(f"loss/{term.name}", (coefficients[i] * count) * values)
        total = total + (coefficients[i] * values).sum()
        if need_grad:
            g = g.mul_(coefficients[i][:, None])
            dense_grad = g if dense_grad is None else dense_grad.add_(g)
    if not need_grad:
        return total, None
    grad_sum = sum(g.sum(-1) for g in grads) if grads else z.new_zeros(z.shape[0])  # (n,)
    if dense_grad is None:  # sparse terms only: -p * sum_v G_v as e * (-sum_v G_v / s), in e's memory
        grad = e.mul_(grad_sum[:, None].div(sums).neg_())
    elif grads:  # a dense term's G sums to 0 over v (terms.DenseFn): -p * sum_v G_v is the sparse terms'
        grad = dense_grad.addcmul_(p, grad_sum.neg()[:, None])
    else:
        grad = dense_grad
    for support, grad_at in zip(supports, grads, strict=True):
        grad.scatter_add_(-1, support, grad_at)
    if temperature != 1.0:
        grad.div_(temperature)
    return total, grad
