"""The composed distillation objective: a sum of terms, each a divergence x a gate x a weight.

    L = (1 / N_valid) * sum_t sum_i weight_i(step) * gate_i(H_t) * D_i(t)

with N_valid the number of valid response tokens of the whole rollout batch (PAPER.md section 2, step 5).
The paper's EOPD is two terms: the PPO-clipped sampled reverse KL on every token, plus forward KL over the
teacher's top-16 gated by 1[H_t >= 0.8] with weight alpha = 1 (`preset("eopd")`); OPD is the first term
alone (`preset("opd")`).

Every call also returns detached diagnostics (`Metrics`) whatever the objective trains: divergences,
entropies, gate statistics, PPO statistics. Log keys are slash-namespaced (`div/fkl_high_entropy`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from eopd.objectives import divergences as D
from eopd.objectives.diagnostics import student_metrics, teacher_metrics
from eopd.objectives.fused import LinearLogits, LogitSource, source_rows, source_tile, tiled_loss
from eopd.objectives.gates import PAPER_TAU
from eopd.objectives.reduction import Metrics
from eopd.objectives.teacher_stats import TeacherStats, teacher_token_stats
from eopd.objectives.terms import Term, Tile


class ObjectiveOutput(NamedTuple):
    loss: Tensor
    """0-dim float32 loss: this call's share of the token mean over the whole batch."""
    metrics: Metrics
    """Detached diagnostics (weighted sums), mergeable across micro-batches; `.means()` gives floats."""


@dataclass(frozen=True)
class Objective:
    """A sum of `Term`s with one temperature, plus the diagnostics logged with every loss.

    Attributes:
        terms: the summands.
        temperature: the temperature both models are scored at; must equal the sampling temperature.
        top_k: how many teacher top-k statistics the objective (and its diagnostics) use.
        diagnostic_tau: the entropy threshold (nats) splitting tokens into high and low entropy in the
            diagnostics, the same for every objective so that variants stay comparable (paper: 0.8).
        chunk_size: token positions per tile of logits; bounds peak memory at about chunk_size x V floats.
        name: a label for logs.
    """

    terms: tuple[Term, ...]
    temperature: float = 1.0
    top_k: int = 16
    diagnostic_tau: float = PAPER_TAU
    chunk_size: int = 256
    name: str = "custom"

    def __post_init__(self) -> None:
        object.__setattr__(self, "terms", tuple(self.terms))
        if not self.terms:
            raise ValueError("an objective needs at least one term")
        D._check_temperature(self.temperature)
        D.check_top_k(self.top_k)
        for term in self.terms:
            if term.kind == "topk_fkl" and term.options["k"] > self.top_k:
                raise ValueError(
                    f"term {term.name!r} uses k={term.options['k']} but the objective keeps top_k={self.top_k} "
                    "teacher statistics; raise top_k"
                )
        if self.diagnostic_tau < 0:
            raise ValueError(f"diagnostic_tau={self.diagnostic_tau!r} must be >= 0 nats")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size={self.chunk_size!r} must be a positive number of token positions")
        names = [t.name for t in self.terms]
        if len(set(names)) != len(names):
            raise ValueError(f"term names {names} must be unique (set Term.name)")

    @property
    def needs_teacher_logits(self) -> bool:
        """True when a term needs the teacher's full distribution during the update (not just its stats)."""
        return any(t.spec.needs_teacher_logits for t in self.terms)

    @property
    def needs_old_logprobs(self) -> bool:
        return any(t.spec.needs_old_logprobs for t in self.terms)

    def gate_weights(self, teacher_entropy: Tensor, mask: Tensor, *, step: int = 0) -> Tensor:
        """Per-term gate weights (n_terms, ...) for a whole rollout batch, before it is split."""
        mask = mask.bool()
        return torch.stack([t.gate(teacher_entropy, mask, step=step) for t in self.terms])

    def __call__(
        self,
        *,
        student: LogitSource,
        tokens: Tensor,
        mask: Tensor,
        teacher_stats: TeacherStats | None = None,
        teacher: LogitSource | None = None,
        old_logprobs: Tensor | None = None,
        gate_weights: Tensor | None = None,
        step: int = 0,
        num_valid_tokens: int | Tensor | None = None,
        token_logprobs_out: Tensor | None = None,
    ) -> ObjectiveOutput:
        """Loss and diagnostics for a batch of response positions of shape (...), e.g. (B, T).

        Args:
            student: student logits (..., V) or `LinearLogits` (hidden (..., H) and output weight).
            tokens: (...) the sampled tokens y_t.
            mask: (...) True on valid response tokens.
            teacher_stats: the teacher's per-token statistics (...); computed from `teacher` when None.
            teacher: the teacher's logits (..., V) or `LinearLogits`; needed by full-vocabulary terms, and
                when given the diagnostics include the exact full-vocabulary forward and reverse KL.
            old_logprobs: (...) log pi_old(y_t) of the rollout policy, for "ppo_rkl". When None, the
                current student's own log-probs stand in (a single on-policy update: ratio 1, no clip).
            gate_weights: (n_terms, ...) from `gate_weights` over the whole rollout batch; computed on this
                call's batch when None (correct for a batch that is not split).
            step: the optimizer step, for schedules and random gates.
            num_valid_tokens: valid tokens of the whole batch across micro-batches and ranks; this call's
                count when None.
            token_logprobs_out: optional float32 tensor shaped like `tokens`; filled at the valid
                positions with the student's log pi(y_t) as scored here (detached), e.g. to keep them as
                the old policy's without a second pass over the vocabulary.

        Returns:
            ObjectiveOutput(loss, metrics).
        """
        mask = self._check_inputs(student, tokens, mask, teacher_stats, teacher, old_logprobs, gate_weights)
        if teacher_stats is None:
            if teacher is None:
                raise ValueError("pass teacher_stats or the teacher's logits (teacher=...)")
            teacher_stats = teacher_token_stats(
                teacher, tokens, k=self.top_k, temperature=self.temperature, chunk_size=self.chunk_size
            )
        elif teacher_stats.temperature != self.temperature:
            raise ValueError(
                f"teacher_stats were computed at temperature {teacher_stats.temperature} but the objective "
                f"scores at {self.temperature}; sampling and scoring temperatures must agree"
            )
        if teacher_stats.k < self.top_k:
            raise ValueError(
                f"teacher_stats keep k={teacher_stats.k} tokens but the objective needs {self.top_k}"
            )
        if gate_weights is None:
            gate_weights = self.gate_weights(teacher_stats.entropy, mask, step=step)

        flat_student = source_rows(student, mask)
        flat_teacher = None if teacher is None else source_rows(teacher, mask)
        stats = teacher_stats.rows(mask)
        flat_tokens = tokens[mask]
        flat_old = None if old_logprobs is None else old_logprobs[mask].float()
        gates = gate_weights[:, mask].float()  # (n_terms, N)
        n_local = int(flat_tokens.shape[0])
        count = float(n_local if num_valid_tokens is None else num_valid_tokens)
        count = max(count, 1.0)
        weights = [t.weight(step) for t in self.terms]
        coefficients = (
            torch.stack([w * g for w, g in zip(weights, gates, strict=True)]) / count
        )  # (n_terms, N)

        metrics = Metrics()
        teacher_metrics(metrics, stats, gates, self.terms, self.diagnostic_tau)
        flat_token_logp = None
        if token_logprobs_out is not None:
            if token_logprobs_out.shape != tokens.shape:
                raise ValueError(
                    f"token_logprobs_out shape {tuple(token_logprobs_out.shape)} != tokens shape "
                    f"{tuple(tokens.shape)}"
                )
            flat_token_logp = flat_tokens.new_zeros(flat_tokens.shape, dtype=torch.float32)

        def teacher_log_probs(start: int, end: int) -> Tensor:
            logits = source_tile(flat_teacher, start, end)
            return torch.log_softmax(logits if self.temperature == 1.0 else logits / self.temperature, -1)

        def tile_loss(student_logits: Tensor, start: int, end: int) -> Tensor:
            logp = torch.log_softmax(student_logits / self.temperature, dim=-1)  # (n, V)
            tile = Tile(
                tokens=flat_tokens[start:end],
                old_logprobs=None,
                stats=stats.rows(slice(start, end)),
                teacher_logp=None,
            )
            token_logp = logp.gather(-1, tile.tokens[:, None]).squeeze(-1)
            if flat_token_logp is not None:
                flat_token_logp[start:end] = token_logp.detach()
            tile.old_logprobs = token_logp.detach() if flat_old is None else flat_old[start:end]
            if flat_teacher is not None:
                tile.teacher_logp = teacher_log_probs(start, end)
            total = logp.new_zeros(())
            for i, term in enumerate(self.terms):
                values = term.spec.fn(logp, tile, term.options)
                coefficient = coefficients[i, start:end]
                total = total + (coefficient * values).sum()
                metrics.add(f"loss/{term.name}", (coefficient * count) * values.detach())
            student_metrics(
                metrics,
                logp.detach(),
                token_logp.detach(),
                tile,
                gates[:, start:end],
                terms=self.terms,
                diagnostic_tau=self.diagnostic_tau,
            )
            return total

        def closed_form_tile(student_logits: Tensor, start: int, end: int, need_grad: bool):
            tile = Tile(
                tokens=flat_tokens[start:end],
                old_logprobs=None if flat_old is None else flat_old[start:end],
                stats=stats.rows(slice(start, end)),
                teacher_logp=None,
            )
            if flat_teacher is not None:
                tile.teacher_logp = teacher_log_probs(start, end)
                tile.teacher_p = tile.teacher_logp.exp()
            return self._closed_form_tile(
                student_logits,
                tile,
                coefficients[:, start:end],
                count,
                metrics,
                gates[:, start:end],
                need_grad,
                None if flat_token_logp is None else flat_token_logp[start:end],
            )

        if all(term.closed_form for term in self.terms):
            loss = tiled_loss(flat_student, closed_form_tile, chunk_size=self.chunk_size, analytic_grad=True)
        else:
            loss = tiled_loss(flat_student, tile_loss, chunk_size=self.chunk_size)
        metrics.add_sums("loss/total", loss.detach() * count, n_local)
        if token_logprobs_out is not None:
            token_logprobs_out[mask] = flat_token_logp.to(token_logprobs_out.dtype)
        return ObjectiveOutput(loss, metrics)

    def _closed_form_tile(
        self,
        logits: Tensor,
        tile: Tile,
        coefficients: Tensor,
        count: float,
        metrics: Metrics,
        gates: Tensor,
        need_grad: bool,
        token_logp_out: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """One tile's loss and d loss / d logits in closed form, for objectives of closed-form terms only.

        With log p = log_softmax(z / T) and G = d L / d log p, the chain rule through the softmax gives
            d L / d z = (G - p * sum_v G_v) / T.
        Sparse terms contribute G on their supports only (the sampled token, the teacher's top-k), dense
        ones (`TermKind.dense`: full-vocabulary KL, entropy) a full row each; either way the full-vocabulary
        work is a log-softmax, an exp shared with the diagnostics and a few fused row operations: no
        autograd graph over (n, V) tensors.

        Args:
            logits: (n, V) float32 student logits of the tile; overwritten (with the log-probs).
            coefficients: (n_terms, n) weight x gate / N_valid per term and token.
            gates: (n_terms, n) gate weights, for the diagnostics.
        """
        # In place: at a 150k vocabulary each (n, V) float32 tensor is what bounds the chunk size.
        z = logits if self.temperature == 1.0 else logits.div_(self.temperature)
        logp = z.sub_(torch.logsumexp(z, dim=-1, keepdim=True))  # (n, V)
        p = logp.exp()
        student_entropy = -torch.einsum("nv,nv->n", p, logp)
        token_logp = logp.gather(-1, tile.tokens[:, None]).squeeze(-1)
        if token_logp_out is not None:
            token_logp_out.copy_(token_logp)
        if tile.old_logprobs is None:
            tile.old_logprobs = token_logp
        # Diagnostics first: the last dense term may build its gradient in the teacher's tensors.
        student_metrics(
            metrics,
            logp,
            token_logp,
            tile,
            gates,
            student_entropy=student_entropy,
            student_p=p,
            terms=self.terms,
            diagnostic_tau=self.diagnostic_tau,
        )
        total = logp.new_zeros(())
        supports, grads = [], []
        with torch.enable_grad():
            for i, term in enumerate(self.terms):
                if not term.sparse:
                    continue
                support = term.spec.support(tile, term.options)  # (n, m)
                at = logp.gather(-1, support).requires_grad_(need_grad)
                values = term.spec.gathered(at, tile, term.options)
                term_total = (coefficients[i] * values).sum()
                metrics.add(f"loss/{term.name}", (coefficients[i] * count) * values.detach())
                total = total + term_total.detach()
                if need_grad:
                    (grad_at,) = torch.autograd.grad(term_total, at)
                    supports.append(support)
                    grads.append(grad_at)
        dense = [i for i, term in enumerate(self.terms) if not term.sparse]
        dense_grad = None  # (n, V): sum over dense terms of coefficient x G
        for i in dense:
            term = self.terms[i]
            consume = i == dense[-1]
            values, g = term.spec.dense(logp, p, tile, term.options, need_grad, consume)
            metrics.add(f"loss/{term.name}", (coefficients[i] * count) * values)
            total = total + (coefficients[i] * values).sum()
            if need_grad:
                g = g.mul_(coefficients[i][:, None])
                dense_grad = g if dense_grad is None else dense_grad.add_(g)
        if not need_grad:
            return total, None
        grad_sum = sum(g.sum(-1) for g in grads) if grads else logp.new_zeros(logp.shape[0])  # (n,)
        if dense_grad is not None:
            grad_sum = grad_sum + dense_grad.sum(-1)
        grad = p.mul_(-grad_sum[:, None])  # p is not needed any more: reuse its memory
        if dense_grad is not None:
            grad.add_(dense_grad)
        for support, grad_at in zip(supports, grads, strict=True):
            grad.scatter_add_(-1, support, grad_at)
        if self.temperature != 1.0:
            grad.div_(self.temperature)
        return total, grad

    # ---- input checks -----------------------------------------------------------------------------

    def _check_inputs(
        self, student, tokens, mask, teacher_stats, teacher, old_logprobs, gate_weights
    ) -> Tensor:
        if mask.shape != tokens.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != tokens shape {tuple(tokens.shape)}")
        lead = tuple(student.shape[:-1])
        if lead != tuple(mask.shape):
            raise ValueError(
                f"student positions {lead} do not match mask shape {tuple(mask.shape)}: pass the student's "
                "logits (or hidden states) at the response positions only"
            )
        vocab = student.shape[-1]
        if teacher is not None:
            if tuple(teacher.shape[:-1]) != lead:
                raise ValueError(f"teacher positions {tuple(teacher.shape[:-1])} != student positions {lead}")
            if teacher.shape[-1] != vocab:
                raise ValueError(
                    f"student vocab size {vocab} != teacher vocab size {teacher.shape[-1]}: slice both to the "
                    "shared vocabulary (LinearLogits(vocab_size=...) or logits[..., :V])"
                )
        elif self.needs_teacher_logits:
            needing = [t.name for t in self.terms if t.spec.needs_teacher_logits]
            raise ValueError(
                f"terms {needing} need the teacher's full logits: pass teacher=... (logits or LinearLogits)"
            )
        if teacher_stats is not None and tuple(teacher_stats.entropy.shape) != tuple(mask.shape):
            raise ValueError(
                f"teacher_stats shape {tuple(teacher_stats.entropy.shape)} != mask shape {tuple(mask.shape)}"
            )
        if old_logprobs is not None and old_logprobs.shape != mask.shape:
            raise ValueError(
                f"old_logprobs shape {tuple(old_logprobs.shape)} != mask shape {tuple(mask.shape)}"
            )
        if gate_weights is not None and tuple(gate_weights.shape) != (len(self.terms), *mask.shape):
            raise ValueError(
                f"gate_weights shape {tuple(gate_weights.shape)} != (n_terms={len(self.terms)}, *mask.shape)"
            )
        D.check_top_k(self.top_k, vocab)
        mask = mask.bool()
        for name, source in (("student", student), ("teacher", teacher)):
            if source is None:
                continue
            values = source.hidden if isinstance(source, LinearLogits) else source
            if not bool(torch.isfinite(values[mask]).all()):
                kind = "hidden states" if isinstance(source, LinearLogits) else "logits"
                raise ValueError(f"{name} {kind} contain NaN or inf at valid positions")
        if tokens[mask].numel() and (int(tokens[mask].max()) >= vocab or int(tokens[mask].min()) < 0):
            raise ValueError(f"sampled tokens must lie in [0, {vocab}); got max {int(tokens[mask].max())}")
        return mask
