"""The rollout batch: prompts and sampled responses laid out for scoring, and the padding that builds it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class RolloutBatch:
    """Prompts and the responses sampled for them, laid out so that scoring needs no re-padding.

    Each row is `[left padding][prompt][response][right padding]`; the prompt block has P columns and
    the response block R. Position ids always come from `attention_mask` (see
    `eopd.scoring.position_ids_from_mask`), so padding never shifts positions.

    Attributes:
        input_ids: (B, P + R) long, left-padded prompts followed by right-padded responses.
        attention_mask: (B, P + R) long, 1 on prompt and response tokens, 0 on padding. Its last R
            columns equal `response_mask`.
        response_mask: (B, R) bool, True on response tokens up to and including the first end token,
            False after it and on padding.
        prompt_length: P, the width of the prompt block.
        truncated: (B,) bool, True where no end token came within the token limit.
        sampler_logprobs: (B, R) float32, the log-probability of each sampled token under the
            distribution the sampler drew from (temperature and top-p applied; 0 under greedy decoding),
            0 where `response_mask` is False. None when unknown.
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    prompt_length: int
    truncated: Tensor
    sampler_logprobs: Tensor | None = None

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2 or self.attention_mask.shape != self.input_ids.shape:
            raise ValueError(
                f"input_ids must be (B, P + R) and attention_mask the same shape, got "
                f"{tuple(self.input_ids.shape)} and {tuple(self.attention_mask.shape)}"
            )
        batch_size, length = self.input_ids.shape
        if not 1 <= self.prompt_length < length:
            raise ValueError(f"prompt_length must lie in [1, {length}), got {self.prompt_length}")
        expected = (batch_size, length - self.prompt_length)
        if tuple(self.response_mask.shape) != expected:
            raise ValueError(
                f"response_mask must have shape {expected}, got {tuple(self.response_mask.shape)}"
            )
        if self.response_mask.dtype != torch.bool:
            raise ValueError(f"response_mask must be bool, got {self.response_mask.dtype}")
        if tuple(self.truncated.shape) != (batch_size,):
            raise ValueError(f"truncated must have shape ({batch_size},), got {tuple(self.truncated.shape)}")
        if self.sampler_logprobs is not None and tuple(self.sampler_logprobs.shape) != expected:
            raise ValueError(
                f"sampler_logprobs must have shape {expected}, got {tuple(self.sampler_logprobs.shape)}"
            )

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_length(self) -> int:
        """R, the width of the response block."""
        return self.response_mask.shape[1]

    @property
    def prompts(self) -> Tensor:
        """(B, P) the left-padded prompts."""
        return self.input_ids[:, : self.prompt_length]

    @property
    def responses(self) -> Tensor:
        """(B, R) the right-padded responses."""
        return self.input_ids[:, self.prompt_length :]

    @property
    def response_lengths(self) -> Tensor:
        """(B,) long, the number of response tokens per row, the end token included."""
        return self.response_mask.sum(dim=-1)

    @property
    def num_valid_tokens(self) -> int:
        """Response tokens in the whole batch: the denominator of a token-mean loss."""
        return int(self.response_mask.sum())

    def to(self, device: torch.device | str) -> RolloutBatch:
        """The same batch with every tensor on `device`."""
        return RolloutBatch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            response_mask=self.response_mask.to(device),
            prompt_length=self.prompt_length,
            truncated=self.truncated.to(device),
            sampler_logprobs=None if self.sampler_logprobs is None else self.sampler_logprobs.to(device),
        )

    def select(self, indices: Tensor | Sequence[int] | slice) -> RolloutBatch:
        """The sub-batch of the given rows (for mini-batches); P and R stay as they are.

        Args:
            indices: row indices (a list or a long tensor), a bool row mask (B,), or a slice.
        """
        if not isinstance(indices, slice):
            indices = torch.as_tensor(indices, device=self.input_ids.device)
            if indices.dtype != torch.bool:
                indices = indices.long()
        return RolloutBatch(
            input_ids=self.input_ids[indices],
            attention_mask=self.attention_mask[indices],
            response_mask=self.response_mask[indices],
            prompt_length=self.prompt_length,
            truncated=self.truncated[indices],
            sampler_logprobs=None if self.sampler_logprobs is None else self.sampler_logprobs[indices],
        )

    @classmethod
    def concat(cls, batches: Sequence[RolloutBatch], *, pad_token_id: int) -> RolloutBatch:
        """Stack batches along rows, left-padding prompt blocks and right-padding response blocks.

        Args:
            batches: batches that may differ in P and R.
            pad_token_id: id written into the new padding (it is masked out either way).

        Returns:
            A batch with P = max P and R = max R; `sampler_logprobs` is None unless every batch has it.
        """
        if not batches:
            raise ValueError("concat needs at least one batch")
        prompt_length = max(b.prompt_length for b in batches)
        response_length = max(b.response_length for b in batches)
        keep_logprobs = all(b.sampler_logprobs is not None for b in batches)
        parts: dict[str, list[Tensor]] = {k: [] for k in ("ids", "attn", "resp", "trunc", "logp")}
        for b in batches:
            left = prompt_length - b.prompt_length
            right = response_length - b.response_length
            pad = torch.nn.functional.pad
            prompt_ids = pad(b.prompts, (left, 0), value=pad_token_id)
            response_ids = pad(b.responses, (0, right), value=pad_token_id)
            parts["ids"].append(torch.cat([prompt_ids, response_ids], dim=1))
            parts["attn"].append(pad(b.attention_mask, (left, right), value=0))
            parts["resp"].append(pad(b.response_mask, (0, right), value=False))
            parts["trunc"].append(b.truncated)
            if keep_logprobs:
                parts["logp"].append(pad(b.sampler_logprobs, (0, right), value=0.0))
        return cls(
            input_ids=torch.cat(parts["ids"]),
            attention_mask=torch.cat(parts["attn"]),
            response_mask=torch.cat(parts["resp"]),
            prompt_length=prompt_length,
            truncated=torch.cat(parts["trunc"]),
            sampler_logprobs=torch.cat(parts["logp"]) if keep_logprobs else None,
        )


def pad_prompts(prompts: list[list[int]], pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Left-pad token-id prompts into one tensor, so that every prompt ends in the last column.

    Args:
        prompts: B non-empty lists of token ids.
        pad_token_id: id for the padding.

    Returns:
        input_ids: (B, P) long, P the longest prompt.
        attention_mask: (B, P) long, 0 on padding.
    """
    if not prompts:
        raise ValueError("prompts must hold at least one prompt")
    for index, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompts[{index}] is empty; a prompt needs at least one token to predict from")
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.as_tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids, attention_mask


def with_prompts(batch: RolloutBatch, prompts: list[list[int]], *, pad_token_id: int) -> RolloutBatch:
    """The same responses behind other prompts: e.g. the teacher's chat-formatted copy of a rollout.

    Args:
        batch: the rollout.
        prompts: one list of token ids per row, in the other model's format.
        pad_token_id: id for the new left padding.

    Returns:
        A batch whose prompt block is `prompts` (left-padded) and whose response block, response mask,
        truncation flags and sampler log-probs are those of `batch`.
    """
    if len(prompts) != batch.batch_size:
        raise ValueError(f"got {len(prompts)} prompts for a batch of {batch.batch_size} rows")
    prompt_ids, prompt_mask = pad_prompts(prompts, pad_token_id)
    device = batch.input_ids.device
    return RolloutBatch(
        input_ids=torch.cat([prompt_ids.to(device), batch.responses], dim=1),
        attention_mask=torch.cat([prompt_mask.to(device), batch.response_mask.long()], dim=1),
        response_mask=batch.response_mask,
        prompt_length=prompt_ids.shape[1],
        truncated=batch.truncated,
        sampler_logprobs=batch.sampler_logprobs,
    )
