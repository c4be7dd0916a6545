"""Where a training step's responses come from, and what they earn: the `Sampling` mixin of `DistillModule`.

The student samples them (on-policy), or the teacher (off-policy KD), or per rollout batch one or the other
(a GKD-style mix); a prompt may be sampled several times (`rollout.n_samples`, adjacent rows: a group);
with a reward function every response is graded. Every random draw comes from `_stream`, a function of the
run's seed and the rollout step, so a resumed run draws the same.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from eopd.batch import RolloutBatch, with_prompts
from eopd.rollout import sample
from eopd.scoring import remap_end_token


class Sampling:
    """Rollouts and rewards for `DistillModule` (which holds the attributes read here)."""

    def grade(self, batch: list[dict[str, Any]], rollout: RolloutBatch) -> Tensor | None:
        """One reward per response (B,) from `reward`, on the decoded responses; None without one."""
        if self.reward is None:
            return None
        mask = rollout.response_mask
        texts = [
            self.tokenizer.decode(rollout.responses[i][mask[i]].tolist(), skip_special_tokens=True)
            for i in range(rollout.batch_size)
        ]
        return torch.tensor([float(r) for r in self.reward(batch, texts)], dtype=torch.float32)

    def make_rollout(self, batch: list[dict[str, Any]]) -> tuple[RolloutBatch, bool]:
        """Sample one response per prompt from the student (or the teacher); return it in student format."""
        spec = self.rollout_spec
        generator = torch.Generator(device=self.device).manual_seed(self._stream(0))
        if spec.source == "student":
            on_policy = True
        elif spec.source == "teacher":
            on_policy = False
        else:
            seed = self._stream(1)
            if self.sharded:  # one coin for all ranks: sampling the sharded student takes every rank
                seed -= self.global_rank  # rank 0's stream
            coin = torch.Generator().manual_seed(seed)
            on_policy = bool(torch.rand((), generator=coin) < spec.lmbda)
        student_prompts = [row["prompt_ids"] for row in batch]
        common = dict(
            max_new_tokens=spec.max_new_tokens,
            pad_token_id=self.pair.pad_token_id,
            temperature=spec.temperature,
            top_p=spec.top_p,
            generator=generator,
            vocab_size=self.pair.vocab_size,
        )
        if on_policy:
            drawn = self.on_student(
                lambda student: self.engine.generate(
                    student,
                    student_prompts,
                    eos_token_ids=self.pair.student_eos_ids,
                    seed=self._stream(0),
                    **common,
                ),
                gathered=True,  # ranks draw responses of different lengths: no per-token collectives
            )
            return drawn, True
        teacher_prompts = [row.get("teacher_prompt_ids", row["prompt_ids"]) for row in batch]
        drawn = self.on_teacher(
            lambda teacher: sample(
                teacher, teacher_prompts, eos_token_ids=self.pair.teacher_eos_ids, **common
            ),
            gathered=True,  # as for the student: ranks draw different numbers of tokens
        )
        rollout = with_prompts(drawn, student_prompts, pad_token_id=self.pair.pad_token_id)
        if self.pair.remap_end_token is not None:  # the teacher's end token, as the student would write it
            to_id, from_id = self.pair.remap_end_token
            ids = remap_end_token(rollout.input_ids, rollout.response_mask, from_id=from_id, to_id=to_id)
            rollout = RolloutBatch(
                ids,
                rollout.attention_mask,
                rollout.response_mask,
                rollout.prompt_length,
                rollout.truncated,
                rollout.sampler_logprobs,
            )
        return rollout, False

    def _stream(self, purpose: int) -> int:
        """A seed for one purpose at this rollout step: reproducible, and the same after a resume.

        Reduced below 2**63 so that any run seed gives a valid generator seed; seeds below about 10**9
        are unchanged by the reduction.
        """
        rank = self.global_rank if self._distributed else 0
        return ((self.seed * 1_000_003 + self.rollout_step * 101 + purpose) * 7919 + rank) % 2**63
