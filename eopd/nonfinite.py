"""The optimizer step with its guard against non-finite updates, a mixin of `DistillModule`.

An update whose student hidden states, loss or gradient norm are not finite on any rank is skipped (the
step is still taken, with no gradients, so the step count, the LR schedule and the checkpoints stay on the
run's plan), counted as `fault/skipped_updates`, and after `update.max_nonfinite_in_a_row` in a row the
run stops with `NonFiniteTraining`.
"""

from __future__ import annotations

import logging
import math

import torch

from eopd.checkpointing import NonFiniteTraining
from eopd.objectives import Metrics

log = logging.getLogger("eopd.module")  # the training step's logger: the warning belongs to the step


class NonFiniteGuard:
    """Needs `student`, `update_spec`, `skipped_updates`, `nonfinite_in_a_row`, `rollout_step`,
    `global_step` and `_any_rank` (from `Placement`)."""

    def _clip_and_step(self, optimizer, scheduler, metrics: Metrics) -> float:
        params = [p for p in self.student.parameters() if p.grad is not None]
        max_norm = self.update_spec.grad_clip if self.update_spec.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.zeros(())
        # Sharded gradients are DTensors: their norm is the global one, reduced over the shards.
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        checked = ("loss/", "train/", "student/")
        losses = [metrics.sums[k] for k in metrics.sums if k.startswith(checked)]
        finite = math.isfinite(grad_norm) and (not losses or bool(torch.stack(losses).isfinite().all()))
        if self._any_rank(not finite):
            values = {**metrics.means(), "train/grad_norm": grad_norm}
            bad = {k: v for k, v in values.items() if k.startswith(checked) and not math.isfinite(v)}
            # Skip the update but still take the step: with no gradients AdamW changes nothing, and the
            # step count, LR schedule and checkpoints stay on the run's plan.
            optimizer.zero_grad(set_to_none=True)
            self._count_nonfinite(bad)
        else:
            self.nonfinite_in_a_row = 0
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        return grad_norm

    def _count_nonfinite(self, bad: dict[str, float]) -> None:
        self.skipped_updates += 1
        self.nonfinite_in_a_row += 1
        limit = self.update_spec.max_nonfinite_in_a_row
        values = ", ".join(f"{k}={v}" for k, v in sorted(bad.items())) or "non-finite on another rank"
        where = f"optimizer step {self.global_step} (rollout step {self.rollout_step + 1})"
        if limit and self.nonfinite_in_a_row >= limit:
            raise NonFiniteTraining(
                f"{self.nonfinite_in_a_row} updates in a row were not finite, the last at {where}: {values}. "
                f"Stopped (update.max_nonfinite_in_a_row={limit}); the weights are those of the last finite "
                "update. Lower optimizer.lr or set update.grad_clip, then resume from the last checkpoint"
            )
        log.warning("skipped the update at %s: %s (%d in a row)", where, values, self.nonfinite_in_a_row)
