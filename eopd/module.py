"""DistillModule: one LightningModule holding the student and the frozen teacher, one rollout batch a step.

A training step, as in the paper (PAPER.md section 3), flows one way:

    prompts -> rollout (student samples; or the teacher, or a per-batch mix)
            -> teacher statistics (one teacher forward, reduced tile by tile: no full teacher logits)
            -> old log-probs (one student forward, no grad) and the diagnostics at the rollout policy
            -> ppo_epochs x (rollout batch / mini-batch) optimizer steps on the objective

Usable without Hydra:

    module = DistillModule(student, teacher, preset("eopd"), tokenizer=tok, pair=PairSpec(...))
    lightning.Trainer(max_steps=...).fit(module, train_dataloaders=prompt_loader)

The teacher is deliberately not a registered submodule: it stays in eval mode whatever `fit` does, has no
gradients, is not in the optimizer and not in any checkpoint.

Where the two models live (one device, DDP, FSDP2 shards) is the business of `eopd.placement`, the
mixin `Placement`; the knobs are the dataclasses of `eopd.specs`; what a step logs besides the objective's
metrics is in `eopd.step_logs`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import Tensor

from eopd.batch import RolloutBatch
from eopd.checkpointing import NonFiniteTraining
from eopd.models import has_active_dropout
from eopd.nonfinite import NonFiniteGuard
from eopd.objectives import LinearLogits, Metrics, Objective, Signals, TeacherStats, teacher_token_stats
from eopd.objectives.policy_gradient import group_advantages
from eopd.objectives.terms import normalizer_weights
from eopd.placement import Placement, freeze
from eopd.rollout_engines import HFEngine, RolloutEngine
from eopd.sampling import Sampling
from eopd.scoring import output_weight, response_hidden_states, teacher_hidden_states
from eopd.specs import LogSpec, OptimSpec, PairSpec, RolloutSpec, UpdateSpec, check_sampling_matches_scoring
from eopd.step_logs import PhaseTimer, log_samples, rollout_metrics

log = logging.getLogger("eopd.module")


@dataclass
class _TeacherSide:
    stats: TeacherStats
    hidden: Tensor | None  # (B, R, H_t) kept for full-vocabulary terms and exact diagnostics
    gates: Tensor | None  # (n_terms, B, R) gate weights, decided once per rollout batch over all ranks; None
    # while a gate reads the student's side, decided after the pass at the rollout policy


class DistillModule(Sampling, Placement, NonFiniteGuard, L.LightningModule):
    """On-policy distillation of `student` from a frozen `teacher` with any `Objective`.

    Args:
        student: a causal LM (Hugging Face `PreTrainedModel`), trained.
        teacher: a causal LM sharing the student's vocabulary, frozen.
        objective: the loss (`eopd.objectives.preset("eopd")` or any `Objective`).
        pair: token ids and vocabulary of the pair.
        tokenizer: the student's tokenizer, for decoding logged samples and saving with the student.
        rollout, update, optim, logging: see the Spec classes.
        seed: seeds rollouts, the rollout-source coin and mini-batch shuffling (a function of the step, so
            a resumed run draws the same).
        engine: samples the student (`eopd.rollout_engines`); an `HFEngine` when None. Its name must be
            `rollout.engine`. It is told after every rollout step that the student's weights changed.
        reward: grades responses, `reward(records, texts) -> one float per response`; every sample is graded
            when given (logged as train/reward), and objectives that train on a reward (GRPO) need it.

    The dataloader yields lists of dicts with "prompt_ids" (student format) and optionally
    "teacher_prompt_ids" (teacher format; defaults to the student's) and "prompt" (text, for logs).
    """

    def __init__(
        self,
        student: torch.nn.Module,
        teacher: torch.nn.Module,
        objective: Objective,
        *,
        pair: PairSpec,
        tokenizer: Any = None,
        rollout: RolloutSpec | None = None,
        update: UpdateSpec | None = None,
        optim: OptimSpec | None = None,
        logging: LogSpec | None = None,
        seed: int = 0,
        engine: RolloutEngine | None = None,
        shard_teacher: bool = False,
        reward: Callable[[Sequence[dict[str, Any]], Sequence[str]], Sequence[float]] | None = None,
    ) -> None:
        super().__init__()
        self.student = student
        self._init_placement(student, teacher, shard_teacher)  # the teacher is not a submodule
        self.objective = objective
        self.pair = pair
        self.tokenizer = tokenizer
        self.rollout_spec = rollout or RolloutSpec()
        self.update_spec = update or UpdateSpec()
        self.optim_spec = optim or OptimSpec()
        self.log_spec = logging or LogSpec()
        self.seed = seed
        if engine is None and self.rollout_spec.engine != "hf":
            raise ValueError(
                f"rollout.engine={self.rollout_spec.engine!r} needs the engine object: "
                "DistillModule(..., engine=VLLMEngine(model_path))"
            )
        self.reward = reward
        if reward is not None and tokenizer is None:
            raise ValueError(
                "a reward function grades decoded responses: pass DistillModule(..., tokenizer=...)"
            )
        if objective.needs_advantages and reward is None:
            raise ValueError(
                f"objective {objective.name!r} trains on a task reward: pass DistillModule(..., reward=...)"
            )
        if objective.needs_advantages and self.rollout_spec.n_samples < 2:
            raise ValueError(
                f"objective {objective.name!r} normalises rewards within each prompt's samples: set "
                f"rollout.n_samples >= 2 (got {self.rollout_spec.n_samples})"
            )
        self.engine = engine if engine is not None else HFEngine()
        if self.engine.name != self.rollout_spec.engine:
            raise ValueError(
                f"the engine passed is {self.engine.name!r} but rollout.engine={self.rollout_spec.engine!r}"
            )
        self.automatic_optimization = False
        self.rollout_step = 0
        self.skipped_updates = 0  # updates skipped as not finite, over the run
        self.nonfinite_in_a_row = 0
        self.last_logs: dict[str, float] = {}
        check_sampling_matches_scoring(self.rollout_spec, objective.temperature)
        if self.rollout_spec.top_p < 1:
            warnings.warn(
                f"rollout.top_p={self.rollout_spec.top_p} samples from a truncated distribution while the "
                "objective scores the full one (top-p 1.0): the rollouts are not exactly on-policy; "
                "rollout/sampler_kl_k3 measures how far off they are",
                stacklevel=2,
            )
        freeze(teacher)
        for name, model in (("student", student), ("teacher", teacher)):
            rows = output_weight(model).shape[0]
            if rows < pair.vocab_size:
                raise ValueError(
                    f"{name} output layer has {rows} rows, fewer than the shared vocabulary {pair.vocab_size}"
                )

    # ---- Lightning plumbing ------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        self.student.train()  # from_pretrained returns models in eval mode
        placed = getattr(self.teacher, "hf_device_map", None) is not None  # a device_map: leave it there
        if not (placed or self.teacher_sharded):  # FSDP placed a sharded teacher on the mesh's device
            self.teacher.to(self.device)
        freeze(self.teacher)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return batch  # lists of prompt records: token ids move to the device when the rollout is built

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["eopd"] = {
            "rollout_step": self.rollout_step,
            "skipped_updates": self.skipped_updates,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("eopd", {})
        self.rollout_step = state.get("rollout_step", 0)
        self.skipped_updates = state.get("skipped_updates", 0)
        self.nonfinite_in_a_row = state.get("nonfinite_in_a_row", 0)

    def configure_optimizers(self):
        spec = self.optim_spec
        optimizer = spec.adamw([p for p in self.student.parameters() if p.requires_grad])
        total = self._total_optimizer_steps()
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: spec.factor(step, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _total_optimizer_steps(self) -> int:
        trainer = getattr(self, "_trainer", None)
        if trainer is not None and trainer.max_steps and trainer.max_steps > 0:
            return trainer.max_steps
        return 1_000_000

    # ---- one training step = one rollout batch -----------------------------------------------------

    def training_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        timer = PhaseTimer()
        n_samples = self.rollout_spec.n_samples
        batch = [row for row in batch for _ in range(n_samples)]  # each prompt's samples adjacent: a group
        with timer("rollout"):
            rollout, on_policy = self.make_rollout(batch)
        with timer("teacher"):
            teacher_side = self.score_teacher(rollout, batch)
        with timer("reward"):
            rewards = self.grade(batch, rollout)
        advantages = None
        if self.objective.needs_advantages:
            per_response = group_advantages(rewards, n_samples).to(self.device)  # (B,)
            advantages = per_response[:, None].expand_as(rollout.responses).float()
        with timer("old_logprobs"):
            old_logprobs, diagnostics, reused = self.old_policy_pass(rollout, teacher_side)
        if rewards is not None:
            diagnostics.add("train/reward", rewards)
            if n_samples > 1:  # the share of groups whose samples all score the same: no GRPO signal
                groups = rewards.reshape(-1, n_samples)
                diagnostics.add("train/reward_flat_groups", (groups.amax(-1) == groups.amin(-1)).float())
        lr = self.optimizers().param_groups[0]["lr"]  # the rate this rollout's first update uses
        with timer("update"):
            update_metrics = self.update(
                rollout,
                teacher_side,
                old_logprobs,
                advantages,
                first_diagnostics=diagnostics if reused else None,
            )
        with timer("sync"):
            self.engine.sync_weights(self.student)
        self.rollout_step += 1

        # Under data parallelism every rank logs the metrics of the whole batch, not of its own shard.
        diagnostics, update_metrics = self._all_ranks(diagnostics), self._all_ranks(update_metrics)
        logs = {k: v for k, v in diagnostics.means().items() if not k.startswith(("loss/", "ppo/"))}
        updates = update_metrics.means()
        logs.update({k: v for k, v in updates.items() if k.startswith(("loss/", "ppo/", "train/"))})
        logs["train/loss"] = updates.get("loss/total", float("nan"))
        logs.update(rollout_metrics(self, rollout, old_logprobs, on_policy))
        logs.update({f"time/{k}": v for k, v in timer.seconds.items()})
        total = sum(timer.seconds.values())
        logs["time/step"] = total
        tokens = self._reduce(float(rollout.num_valid_tokens), "sum")
        logs["perf/tokens_per_s"] = tokens / max(total, 1e-9)  # every rank's response tokens
        logs["train/lr"] = lr
        logs["fault/skipped_updates"] = float(self.skipped_updates)
        logs["step/rollout"] = float(self.rollout_step)
        if self.trainer.progress_bar_callback is not None:  # Lightning's logging costs ms per step
            progress = {"loss": logs["train/loss"]}
            for key, short in (("div/fkl", "fkl"), ("entropy/student", "H_s"), ("gate/fraction", "gate")):
                if key in logs:
                    progress[short] = logs[key]
            self.log_dict(progress, prog_bar=True, logger=False, batch_size=rollout.batch_size)
        # Logged at the optimizer step, the step validation and checkpoints use (Lightning's own step under
        # manual optimisation counts batches instead).
        self.last_logs = logs
        for logger in self.loggers:
            logger.log_metrics(logs, step=self.global_step)
        log_samples(self, batch, rollout, teacher_side.stats.entropy)

    @torch.no_grad()
    def score_teacher(self, rollout: RolloutBatch, batch: list[dict[str, Any]]) -> _TeacherSide:
        """One teacher forward on its own copy of the rollout, reduced to per-token statistics and the gates."""
        teacher_prompts = [row.get("teacher_prompt_ids", row["prompt_ids"]) for row in batch]
        hidden = self.on_teacher(
            lambda teacher: teacher_hidden_states(  # (B, R, H_t)
                teacher,
                rollout,
                teacher_prompts,
                pad_token_id=self.pair.pad_token_id,
                remap_end_token_ids=self.pair.remap_end_token,
                pack=self.update_spec.pack_sequences,
            )
        ).to(self.device)  # a teacher placed by a device_map may end its forward on another device
        source = LinearLogits(hidden, self._teacher_weight(), self.pair.vocab_size)
        stats = teacher_token_stats(
            source,
            rollout.responses,
            k=self.objective.top_k,
            temperature=self.objective.temperature,
            chunk_size=self.objective.chunk_size,
            mask=rollout.response_mask,  # no tiles over the padding
        )
        gates = None
        if not self.objective.needs_student_signals:
            gates = self._gate_weights(Signals(teacher_entropy=stats.entropy), rollout.response_mask)
        return _TeacherSide(stats=stats, hidden=hidden, gates=gates)

    def _reuse_on_policy_forward(self) -> bool:
        """Whether the first mini-batch's own forward can stand in for the pass at the rollout policy.

        Before the first optimizer step the student is the rollout policy, so that forward gives log
        pi_old(y_t) and the rollout-policy diagnostics of its rows. It is exact when the training-mode
        forward computes the eval-mode policy (no active dropout) and no gate waits for the student's
        signals of the whole batch (those are decided before any update).
        """
        return (
            self.update_spec.reuse_on_policy_forward
            and not self.objective.needs_student_signals
            and not has_active_dropout(self.student)
        )

    def _row_order(self, epoch: int, n_rows: int) -> Tensor:
        """The order in which `update` visits the rollout's rows in `epoch` (mini-batches are its slices)."""
        if self.update_spec.shuffle:
            return torch.randperm(n_rows, generator=torch.Generator().manual_seed(self._stream(2 + epoch)))
        return torch.arange(n_rows)

    def old_policy_pass(self, rollout: RolloutBatch, teacher: _TeacherSide) -> tuple[Tensor, Metrics, bool]:
        """log pi_old(y_t) and the rollout-policy diagnostics before the update, and whether the update's
        first mini-batch scores its own rows (`_reuse_on_policy_forward`): then this pass covers the other
        mini-batches only (none with one mini-batch), and `update` needs `first_diagnostics=`."""
        if not self._reuse_on_policy_forward():
            return (*self.score_old_policy(rollout, teacher), False)
        others = self._row_order(0, rollout.batch_size)[self.update_spec.mini_batch_size :].sort().values
        return (*self.score_old_policy(rollout, teacher, rows=others), True)

    @torch.no_grad()
    def score_old_policy(
        self, rollout: RolloutBatch, teacher: _TeacherSide, *, rows: Tensor | None = None
    ) -> tuple[Tensor, Metrics]:
        """One student forward: log pi_old(y_t) and every diagnostic at the rollout policy (exact, full vocab).

        When a gate reads the student's side (its entropy, a divergence), the gates are decided here, from
        the signals this pass measures, and stored in `teacher.gates` for the update.

        Args:
            rows: only these rows (the others are the first mini-batch, scored by its own forward in
                `update`; their log-probs stay 0 until then). Only with the gates already decided.
        """
        if rows is not None:
            if teacher.gates is None:
                raise ValueError("rows needs the gates decided before this pass (no gate reads the student)")
            rows = rows.to(self.device)
            old = torch.zeros(rollout.responses.shape, dtype=torch.float32, device=self.device)
            if not len(rows):
                return old, Metrics()
            part = _TeacherSide(teacher.stats.rows(rows), teacher.hidden[rows], teacher.gates[:, rows])
            old[rows], diagnostics = self.score_old_policy(rollout.select(rows), part)
            return old, diagnostics
        mask = rollout.response_mask
        teacher_full = LinearLogits(teacher.hidden, self._teacher_weight(), self.pair.vocab_size)

        def old_policy(model) -> tuple[Tensor, Metrics, Tensor]:
            # Everything that reads the student's output layer stays inside: FSDP frees it afterwards.
            hidden = response_hidden_states(model, rollout, pack=self.update_spec.pack_sequences)  # (B, R, H)
            student = LinearLogits(hidden, output_weight(model), self.pair.vocab_size)
            # One pass over the vocabulary: the diagnostics at the rollout policy, which is the old
            # policy itself (ratio 1), and log pi_old(y_t) kept from the same tiles.
            scores = self.objective.score_rollout(
                student=student,
                tokens=rollout.responses,
                mask=mask,
                teacher_stats=teacher.stats,
                teacher=teacher_full,
                gate_weights=teacher.gates if teacher.gates is not None else self._gate_weights,
                step=self.global_step,
            )
            return scores.token_logprobs, scores.metrics, scores.gate_weights

        was_training = self.student.training
        self.student.eval()  # the policy that sampled: no dropout
        try:
            old, diagnostics, teacher.gates = self.on_student(old_policy)
        finally:
            self.student.train(was_training)
        return old, diagnostics

    def update(
        self,
        rollout: RolloutBatch,
        teacher: _TeacherSide,
        old_logprobs: Tensor,
        advantages: Tensor | None = None,
        *,
        first_diagnostics: Metrics | None = None,
    ) -> Metrics:
        """ppo_epochs x mini-batches optimizer steps on the objective; returns their merged metrics.

        Args:
            first_diagnostics: when given, the first mini-batch is scored by its own forward at the
                rollout policy (`score_old_policy` skipped its rows): its log-probs are written into
                `old_logprobs` and its diagnostics (the teacher's full logits included) merged in here.
        """
        spec = self.update_spec
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        n_rows = rollout.batch_size
        steps_per_epoch = spec.mini_batches(n_rows)
        # DDP averages gradients over ranks; each rank's loss is already divided by the global token
        # count, so the sum over ranks is wanted: scale the average back up.
        world = self.trainer.world_size if self._distributed else 1
        teacher_weight = self._teacher_weight()
        metrics = Metrics()
        for epoch in range(spec.ppo_epochs):
            order = self._row_order(epoch, n_rows)
            for k in range(steps_per_epoch):
                on_policy = first_diagnostics is not None and epoch == 0 and k == 0
                rows = order[k * spec.mini_batch_size : (k + 1) * spec.mini_batch_size].to(self.device)
                count = rollout.response_mask[rows].sum()
                # What each term divides by (`Term.normalize`), over the whole mini-batch of all ranks.
                normalizers = (
                    normalizer_weights(
                        self.objective.terms, teacher.gates[:, rows], rollout.response_mask[rows]
                    )
                    .flatten(1)
                    .sum(-1)
                )
                if self._distributed:
                    count = self.trainer.strategy.reduce(count.float(), reduce_op="sum")
                    normalizers = self.trainer.strategy.reduce(normalizers, reduce_op="sum")
                micro = spec.micro_batch_size or spec.mini_batch_size
                step_metrics = Metrics()
                for start in range(0, len(rows), micro):
                    part = rows[start : start + micro]
                    sub = rollout.select(part)
                    full_teacher = None
                    own_logprobs = None  # on-policy: log pi_old(y_t) from this very forward
                    if on_policy:
                        own_logprobs = torch.zeros(sub.responses.shape, device=self.device)
                    if self.objective.needs_teacher_logits or on_policy:  # on-policy: the exact KLs
                        full_teacher = LinearLogits(
                            teacher.hidden[part], teacher_weight, self.pair.vocab_size
                        )

                    def micro_loss(
                        model,
                        sub=sub,
                        part=part,
                        full_teacher=full_teacher,
                        own_logprobs=own_logprobs,
                        count=count,
                        normalizers=normalizers,
                        step_metrics=step_metrics,
                    ):
                        hidden = response_hidden_states(model, sub, pack=self.update_spec.pack_sequences)
                        if not bool(torch.isfinite(hidden[sub.response_mask]).all()):
                            # The update is skipped below; a finite stand-in keeps every rank's backward
                            # (and, sharded, every collective) in step.
                            step_metrics.add_sums("student/hidden_states", float("nan"), 1.0)
                            hidden = torch.nan_to_num(hidden, nan=0.0, posinf=0.0, neginf=0.0)
                        student = LinearLogits(hidden, output_weight(model), self.pair.vocab_size)
                        out = self.objective(
                            student=student,
                            tokens=sub.responses,
                            mask=sub.response_mask,
                            teacher_stats=teacher.stats.rows(part),
                            teacher=full_teacher,
                            old_logprobs=None if own_logprobs is not None else old_logprobs[part],
                            token_logprobs_out=own_logprobs,
                            gate_weights=teacher.gates[:, part],
                            step=self.global_step,
                            num_valid_tokens=count,
                            normalizers=normalizers,
                            advantages=None if advantages is None else advantages[part],
                        )
                        return out.loss, out.metrics  # a tuple: FSDP hooks the loss for backward

                    # DDP: all-reduce once per optimizer step, on the last micro-batch's backward (the
                    # gradients accumulated before it are summed in); FSDP reduce-scatters every time.
                    last = start + micro >= len(rows)
                    hold = self._distributed and not last
                    with self.trainer.strategy.block_backward_sync() if hold else nullcontext():
                        loss, micro_metrics = self.on_student(micro_loss)
                        self.manual_backward(loss * world if world > 1 else loss)
                    step_metrics.merge([micro_metrics])
                    if on_policy:
                        if "student/hidden_states" in step_metrics.sums:  # not finite: say so, as the
                            own_logprobs.fill_(float("nan"))  # separate pass's NaNs would have
                            first_diagnostics.add_sums("student/hidden_states", float("nan"), 1.0)
                        old_logprobs[part] = own_logprobs
                        first_diagnostics.merge([micro_metrics])
                grad_norm = self._clip_and_step(optimizer, scheduler, step_metrics)
                step_metrics.add_sums("train/grad_norm", grad_norm, 1.0)
                metrics.merge([step_metrics])
        return metrics

    def _gate_weights(self, signals: Signals, mask: Tensor) -> Tensor:
        """Gate weights (n_terms, B, R) of this rank's rows, decided over the batch of ALL ranks.

        Batch-level gates (quantile, random) must see the whole rollout batch: under data parallelism the
        ranks' signals are gathered (`Placement._whole_batch`), gated once, and each rank keeps its own
        rows. A single process gets the same weights from the concatenated batch.
        """
        full, full_mask, rows = self._whole_batch(signals, mask)
        gates = self.objective.gate_weights(full, full_mask, step=self.global_step)
        return gates[:, rows, : mask.shape[1]]


__all__ = [
    "DistillModule",
    "LogSpec",
    "NonFiniteTraining",
    "OptimSpec",
    "PairSpec",
    "RolloutSpec",
    "UpdateSpec",
]
