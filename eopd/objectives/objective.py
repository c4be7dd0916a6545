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

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from eopd.objectives import divergences as D
from eopd.objectives.closed_form import loss_and_grad
from eopd.objectives.diagnostics import gate_metrics, student_metrics, teacher_metrics
from eopd.objectives.fused import (
    LinearLogits,
    LogitSource,
    TileBuffers,
    detached,
    finite_at,
    source_rows,
    tiled_loss,
)
from eopd.objectives.gates import FULL_VOCABULARY_SIGNALS, PAPER_TAU, STUDENT_SIGNALS, Signals, as_signals
from eopd.objectives.reduction import Metrics
from eopd.objectives.teacher_stats import TeacherStats, teacher_token_stats
from eopd.objectives.terms import Term, Tile, normalizer_weights
from eopd.objectives.tile_softmax import softmaxed_tile, tile_distribution


class ObjectiveOutput(NamedTuple):
    loss: Tensor
    """0-dim float32 loss: this call's share of the token mean over the whole batch."""
    metrics: Metrics
    """Detached diagnostics (weighted sums), mergeable across micro-batches; `.means()` gives floats."""


class RolloutScores(NamedTuple):
    """What `Objective.score_rollout` measures at the rollout policy."""

    token_logprobs: Tensor
    """(...) float32 log pi_old(y_t) at valid positions, 0 elsewhere."""
    metrics: Metrics
    """Every diagnostic, the gates' included."""
    gate_weights: Tensor
    """(n_terms, ...) the gates the update uses."""
    signals: Signals
    """The per-token signals measured, each (...)."""


GateRule = Callable[[Signals, Tensor], Tensor]
"""(signals, mask) -> gate weights (n_terms, ...): how a caller decides the gates once signals are known."""


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

    @property
    def needs_advantages(self) -> bool:
        """True when a term trains on a task reward ("ppo_reward"): the trainer grades every sample."""
        return any(t.spec.needs_advantages for t in self.terms)

    @property
    def gate_signals(self) -> frozenset[str]:
        """Every signal the terms' gates read (`eopd.objectives.gates.SIGNALS`)."""
        return frozenset().union(*(t.gate.signals for t in self.terms))

    @property
    def needs_student_signals(self) -> bool:
        """True when a gate reads the student's side: the gates are then decided after the pass at the
        rollout policy (`score_rollout`), not from the teacher's statistics alone."""
        return bool(self.gate_signals & STUDENT_SIGNALS)

    def gate_weights(self, signals: Signals | Tensor, mask: Tensor, *, step: int = 0) -> Tensor:
        """Per-term gate weights (n_terms, ...) for a whole rollout batch, before it is split.

        `signals` is a `Signals`, or the teacher's entropy alone when no gate reads anything else.
        """
        mask = mask.bool()
        signals = as_signals(signals)
        return torch.stack([t.gate(signals, mask, step=step) for t in self.terms])

    @torch.no_grad()
    def score_rollout(
        self,
        *,
        student: LogitSource,
        tokens: Tensor,
        mask: Tensor,
        teacher_stats: TeacherStats,
        teacher: LogitSource | None = None,
        gate_weights: Tensor | GateRule | None = None,
        step: int = 0,
    ) -> RolloutScores:
        """One pass at the rollout policy: log pi_old(y_t), every per-token signal, the gates and the
        diagnostics, with no gradient.

        Args:
            gate_weights: the gates when already decided (from the teacher's side alone), or a rule
                `(signals, mask) -> (n_terms, ...)` applied once this pass has measured the student's
                signals (e.g. gathering them over ranks first); `self.gate_weights` when None.
        """
        rule = gate_weights
        if rule is None:
            rule = lambda signals, m: self.gate_weights(signals, m, step=step)  # noqa: E731
        old = torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)
        signals_box: list[Signals] = []
        gates_box: list[Tensor] = []

        def decide(signals: Signals, m: Tensor) -> Tensor:
            signals_box.append(signals)
            gates = rule if isinstance(rule, Tensor) else rule(signals, m)
            gates_box.append(gates)
            return gates

        out = self._run(
            student=student,
            tokens=tokens,
            mask=mask,
            teacher_stats=teacher_stats,
            teacher=teacher,
            old_logprobs=None,
            gates=decide,
            step=step,
            num_valid_tokens=None,
            token_logprobs_out=old,
        )
        return RolloutScores(old, out.metrics, gates_box[0], signals_box[0])

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
        normalizers: Tensor | None = None,
        advantages: Tensor | None = None,
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
            normalizers: (n_terms,) what each term's sum is divided by (`Term.normalize`), over the whole
                batch across micro-batches and ranks (`terms.normalizer_weights` summed); from this call's
                batch when None ("tokens" terms then use `num_valid_tokens`).
            advantages: (...) a task reward's advantage per token, for "ppo_reward" terms.

        Returns:
            ObjectiveOutput(loss, metrics).
        """
        if gate_weights is None and self.needs_student_signals:
            # The gates read the student at the rollout policy: measure it first (a trainer does this once
            # per rollout batch with `score_rollout` and passes the gates).
            if teacher_stats is None and teacher is not None:
                teacher_stats = teacher_token_stats(
                    teacher, tokens, k=self.top_k, temperature=self.temperature, chunk_size=self.chunk_size
                )
            gate_weights = self.score_rollout(
                student=detached(student),
                tokens=tokens,
                mask=mask,
                teacher_stats=teacher_stats,
                teacher=teacher,
                step=step,
            ).gate_weights
        return self._run(
            student=student,
            tokens=tokens,
            mask=mask,
            teacher_stats=teacher_stats,
            teacher=teacher,
            old_logprobs=old_logprobs,
            gates=gate_weights,
            step=step,
            num_valid_tokens=num_valid_tokens,
            token_logprobs_out=token_logprobs_out,
            normalizers=normalizers,
            advantages=advantages,
        )

    def _run(
        self,
        *,
        student: LogitSource,
        tokens: Tensor,
        mask: Tensor,
        teacher_stats: TeacherStats | None,
        teacher: LogitSource | None,
        old_logprobs: Tensor | None,
        gates: Tensor | GateRule | None,
        step: int,
        num_valid_tokens: int | Tensor | None,
        token_logprobs_out: Tensor | None,
        normalizers: Tensor | None = None,
        advantages: Tensor | None = None,
    ) -> ObjectiveOutput:
        """`__call__`'s body. With `gates` a rule, the gates are decided after the tiles (from the signals
        they measured) and the loss is not formed: for the pass at the rollout policy only."""
        deferred = callable(gates) and not isinstance(gates, Tensor)
        rule, gate_weights = (gates, None) if deferred else (None, gates)
        mask = self._check_inputs(student, tokens, mask, teacher_stats, teacher, old_logprobs, gate_weights)
        if self.needs_advantages and advantages is None and not deferred:
            needing = [t.name for t in self.terms if t.spec.needs_advantages]
            raise ValueError(f"terms {needing} need a task reward's advantages: pass advantages=...")
        if advantages is not None and advantages.shape != mask.shape:
            raise ValueError(f"advantages shape {tuple(advantages.shape)} != mask shape {tuple(mask.shape)}")
        if teacher_stats is None:
            if teacher is None:
                raise ValueError("pass teacher_stats or the teacher's logits (teacher=...)")
            teacher_stats = teacher_token_stats(
                teacher,
                tokens,
                k=self.top_k,
                temperature=self.temperature,
                chunk_size=self.chunk_size,
                mask=mask,
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
        missing = self.gate_signals & FULL_VOCABULARY_SIGNALS if teacher is None else frozenset()
        if missing:
            raise ValueError(
                f"the gates read {sorted(missing)}, which need the teacher's full logits: pass teacher=..."
            )
        if gate_weights is None and not deferred:
            gate_weights = self.gate_weights(teacher_stats.entropy, mask, step=step)

        flat_student = source_rows(student, mask)
        flat_teacher = None if teacher is None else source_rows(teacher, mask)
        stats = teacher_stats.rows(mask)
        flat_tokens = tokens[mask]
        flat_old = None if old_logprobs is None else old_logprobs[mask].float()
        flat_advantages = None if advantages is None else advantages[mask].float()
        if flat_advantages is None and deferred and self.needs_advantages:
            flat_advantages = torch.zeros(flat_tokens.shape, device=flat_tokens.device)  # no loss is formed
        n_local = int(flat_tokens.shape[0])
        # Deferred gates are decided after the tiles; until then every coefficient is 0 (no loss is formed).
        gates = flat_tokens.new_zeros((len(self.terms), n_local), dtype=torch.float32) if deferred else None
        if gates is None:
            gates = gate_weights[:, mask].float()  # (n_terms, N)
        count = float(n_local if num_valid_tokens is None else num_valid_tokens)
        count = max(count, 1.0)
        if normalizers is None:
            ones = torch.ones(n_local, dtype=torch.bool, device=gates.device)
            normalizers = normalizer_weights(self.terms, gates, ones).sum(-1)
            by_tokens = torch.tensor([t.normalize == "tokens" for t in self.terms], device=gates.device)
            normalizers = torch.where(by_tokens, torch.full_like(normalizers, count), normalizers)
        normalizers = normalizers.to(gates.device, torch.float32)
        if tuple(normalizers.shape) != (len(self.terms),):
            raise ValueError(f"normalizers shape {tuple(normalizers.shape)} != (n_terms={len(self.terms)},)")
        # A term whose normaliser is 0 selects no token: its coefficients are 0 whatever it is divided by.
        normalizers = torch.where(normalizers > 0, normalizers, torch.ones_like(normalizers))
        weights = torch.tensor([t.weight(step) for t in self.terms], device=gates.device)
        coefficients = gates * (weights / normalizers)[:, None]  # (n_terms, N)

        metrics = Metrics()
        teacher_metrics(metrics, stats, self.diagnostic_tau)
        per_token: dict[str, list[Tensor]] = {}

        def keep(values: dict[str, Tensor]) -> None:
            for name, value in values.items():
                per_token.setdefault(name, []).append(value.detach())

        flat_token_logp = None
        if token_logprobs_out is not None:
            if token_logprobs_out.shape != tokens.shape:
                raise ValueError(
                    f"token_logprobs_out shape {tuple(token_logprobs_out.shape)} != tokens shape "
                    f"{tuple(tokens.shape)}"
                )
            flat_token_logp = flat_tokens.new_zeros(flat_tokens.shape, dtype=torch.float32)

        # The (n, V) tiles, reused from tile to tile; each of the teacher's beside the student's in one
        # allocation, so that one batched product reads a row of both (`TileBuffers` pairs).
        pairs = None if flat_teacher is None else {"teacher_logits": "logits", "teacher_p": "p"}
        buffers = TileBuffers(pairs=pairs)

        def rows_tile(start: int, end: int, old_logprobs: Tensor | None) -> Tile:
            return Tile(
                tokens=flat_tokens[start:end],
                old_logprobs=old_logprobs,
                stats=stats.rows(slice(start, end)),
                teacher_logp=None,
                advantages=None if flat_advantages is None else flat_advantages[start:end],
            )

        def tile_loss(student_logits: Tensor, start: int, end: int) -> Tensor:
            logp = torch.log_softmax(student_logits / self.temperature, dim=-1)  # (n, V)
            tile = rows_tile(start, end, None)
            token_logp = logp.gather(-1, tile.tokens[:, None]).squeeze(-1)
            if flat_token_logp is not None:
                flat_token_logp[start:end] = token_logp.detach()
            tile.old_logprobs = token_logp.detach() if flat_old is None else flat_old[start:end]
            if flat_teacher is not None:
                tile.teacher_logp, tile.teacher_p = tile_distribution(
                    flat_teacher, start, end, self.temperature, buffers, "teacher_"
                )
            total = logp.new_zeros(())
            for i, term in enumerate(self.terms):
                values = term.spec.fn(logp, tile, term.options)
                coefficient = coefficients[i, start:end]
                total = total + (coefficient * values).sum()
                metrics.add(f"loss/{term.name}", (coefficient * count) * values.detach())
            keep(
                student_metrics(
                    metrics,
                    logp.detach(),
                    token_logp.detach(),
                    tile,
                    terms=self.terms,
                    diagnostic_tau=self.diagnostic_tau,
                )
            )
            return total

        def closed_form_tile(student_logits: Tensor, start: int, end: int, need_grad: bool):
            tile = rows_tile(start, end, None if flat_old is None else flat_old[start:end])
            if flat_teacher is not None:
                peaks = tile.stats.topk_indices[:, :1]  # where the teacher's maxima lie: a gather, no pass
                tile.teacher = softmaxed_tile(
                    flat_teacher, start, end, self.temperature, buffers, "teacher_", peaks
                )
            return loss_and_grad(
                self.terms,
                self.temperature,
                self.diagnostic_tau,
                student_logits,
                tile,
                coefficients[:, start:end],
                count,
                metrics,
                keep,
                need_grad,
                None if flat_token_logp is None else flat_token_logp[start:end],
                buffers=buffers,
            )

        closed = all(term.closed_form for term in self.terms)
        tile_fn = closed_form_tile if closed else tile_loss
        loss = tiled_loss(
            flat_student, tile_fn, chunk_size=self.chunk_size, analytic_grad=closed, buffers=buffers
        )
        if token_logprobs_out is not None:
            token_logprobs_out[mask] = flat_token_logp.to(token_logprobs_out.dtype)
        flat = {name: torch.cat(values) for name, values in per_token.items()}
        if deferred:
            measured = ("student_entropy", "log_ratio") + (("fkl", "rkl") if teacher is not None else ())
            signals = Signals.spread(teacher_stats.entropy, mask, flat, measured)
            gate_weights = rule(signals, mask)
            if tuple(gate_weights.shape) != (len(self.terms), *mask.shape):
                raise ValueError(
                    f"the gate rule returned shape {tuple(gate_weights.shape)}; expected "
                    f"(n_terms={len(self.terms)}, *mask.shape)"
                )
            gates = gate_weights[:, mask].float()
        else:
            metrics.add_sums("loss/total", loss.detach() * count, n_local)
        if n_local:
            gate_metrics(metrics, gates, flat, self.terms)
        return ObjectiveOutput(loss, metrics)

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
            if not finite_at(values, mask):
                kind = "hidden states" if isinstance(source, LinearLogits) else "logits"
                raise ValueError(f"{name} {kind} contain NaN or inf at valid positions")
        if tokens[mask].numel() and (int(tokens[mask].max()) >= vocab or int(tokens[mask].min()) < 0):
            raise ValueError(f"sampled tokens must lie in [0, {vocab}); got max {int(tokens[mask].max())}")
        return mask
