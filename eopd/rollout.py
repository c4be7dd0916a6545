"""On-policy rollouts: the batch format shared by sampler and scorers, and a KV-cached sampling loop."""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache, PreTrainedModel

from eopd.models import position_ids_from_mask, remap_end_token, response_hidden_states


@dataclass
class RolloutBatch:
    """Prompts and the responses sampled for them, laid out so that scoring needs no re-padding.

    Each row is `[left padding][prompt][response][right padding]`; the prompt block has P columns and
    the response block R. Position ids always come from `attention_mask` (see
    `eopd.models.position_ids_from_mask`), so padding never shifts positions.

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


def _draw(
    logits: Tensor, *, temperature: float, top_p: float, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Draw one token per row and return it with its log-probability under the distribution drawn from.

    Args:
        logits: (B, V) float32.

    Returns:
        tokens: (B,) long.
        logprobs: (B,) float32; 0 under greedy decoding, whose distribution is a point mass.
    """
    if temperature == 0:
        tokens = logits.argmax(dim=-1)
        return tokens, torch.zeros(tokens.shape, dtype=torch.float32, device=logits.device)
    logprobs = torch.log_softmax(logits / temperature, dim=-1)  # (B, V)
    if top_p < 1:
        # Keep the smallest set of most likely tokens whose mass reaches top_p: drop a token when the
        # mass strictly before it in sorted order already does. The top token is always kept.
        sorted_logprobs, order = logprobs.sort(dim=-1, descending=True)
        sorted_probs = sorted_logprobs.exp()
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = mass_before >= top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logprobs = torch.log_softmax(logprobs.masked_fill(drop, float("-inf")), dim=-1)
    tokens = torch.multinomial(logprobs.exp(), num_samples=1, generator=generator).squeeze(-1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


def _forward_keywords(model: PreTrainedModel) -> tuple[str, bool]:
    """The model's name for the KV cache argument and whether it accepts `logits_to_keep`."""
    parameters = inspect.signature(model.forward).parameters
    # transformers 5 renamed `past_key_values` to `cache`; the old name still works there but warns.
    cache_keyword = "cache" if "cache" in parameters else "past_key_values"
    return cache_keyword, "logits_to_keep" in parameters


def _new_cache(model: PreTrainedModel) -> DynamicCache:
    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers: no config argument
        return DynamicCache()


def _validate_sampling_arguments(
    prompts: list[list[int]],
    vocab_size: int,
    max_new_tokens: int,
    eos_token_ids: list[int],
    pad_token_id: int,
    temperature: float,
    top_p: float,
) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must lie in (0, 1] (1 disables nucleus sampling), got {top_p!r}")
    if not eos_token_ids:
        raise ValueError("eos_token_ids must name at least one end token id, got an empty sequence")
    for name, ids in [("eos_token_ids", eos_token_ids), ("pad_token_id", [pad_token_id])]:
        for token_id in ids:
            if not 0 <= token_id < vocab_size:
                raise ValueError(
                    f"{name} must lie in [0, {vocab_size}), the model's vocabulary, got {token_id}"
                )
    for index, prompt in enumerate(prompts):
        if prompt and not 0 <= min(prompt) <= max(prompt) < vocab_size:
            raise ValueError(
                f"prompts[{index}] holds ids outside [0, {vocab_size}), the model's vocabulary: "
                f"min {min(prompt)}, max {max(prompt)}"
            )


def sample(
    model: PreTrainedModel,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    eos_token_ids: int | Sequence[int],
    pad_token_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    vocab_size: int | None = None,
) -> RolloutBatch:
    """Sample one response per prompt with a KV cache, recording the sampler's log-probabilities.

    Prompts are left-padded and position ids come from the attention mask, exactly as
    `eopd.models.final_hidden_states` computes them, so scoring the returned batch sees the positions
    the sampler saw. Rows that have ended receive `pad_token_id`, masked out; the loop stops when every
    row has ended. The model runs in eval mode under `torch.no_grad()` and gets its mode back afterwards.

    Args:
        model: a causal LM.
        prompts: B non-empty lists of token ids.
        max_new_tokens: the most response tokens per row, >= 1.
        eos_token_ids: id or ids that end a response; the end token is kept in the response.
        pad_token_id: id written after a row's end (may equal an end id).
        temperature: softmax temperature; 0 decodes greedily.
        top_p: nucleus sampling: draw from the smallest set of most likely tokens whose probability
            reaches top_p (at least one token); 1 samples from the full distribution.
        generator: the random stream for `torch.multinomial`, on the model's device; a generator
            seeded the same reproduces the rollout exactly (for the same batch of prompts).
        vocab_size: sample only among the first `vocab_size` ids: the vocabulary shared with the
            teacher, without the padded rows of the output layer. None = every row.

    Returns:
        A `RolloutBatch` with R <= max_new_tokens (fewer when every row ended early).
    """
    eos_ids = [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids)
    embedding_rows = model.get_input_embeddings().num_embeddings
    _validate_sampling_arguments(
        prompts, embedding_rows, max_new_tokens, eos_ids, pad_token_id, temperature, top_p
    )

    device = next(model.parameters()).device
    input_ids, attention_mask = pad_prompts(prompts, pad_token_id)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    eos = torch.as_tensor(eos_ids, dtype=torch.long, device=device)
    cache_keyword, accepts_logits_to_keep = _forward_keywords(model)
    # Only the last position's logits are needed; at a 150k vocabulary the prompt's would not fit.
    prefill_extra = {"logits_to_keep": 1} if accepts_logits_to_keep else {}

    batch_size = input_ids.shape[0]
    finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
    tokens, valid, logprobs = [], [], []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            cache = _new_cache(model)
            out = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask),
                use_cache=True,
                **{cache_keyword: cache},
                **prefill_extra,
            )
            for step in range(max_new_tokens):
                next_logits = out.logits[:, -1, :vocab_size].float()  # (B, V)
                token, logprob = _draw(next_logits, temperature=temperature, top_p=top_p, generator=generator)
                is_valid = ~finished
                token = torch.where(is_valid, token, torch.full_like(token, pad_token_id))
                tokens.append(token)
                valid.append(is_valid)
                logprobs.append(torch.where(is_valid, logprob, torch.zeros_like(logprob)))
                finished = finished | (is_valid & torch.isin(token, eos))
                if step == max_new_tokens - 1 or bool(finished.all()):
                    break
                # Padding after a row's end is masked, as in the returned batch, so that the positions
                # below are the ones scoring will compute.
                attention_mask = torch.cat([attention_mask, is_valid.long()[:, None]], dim=1)
                out = model(
                    input_ids=token[:, None],
                    attention_mask=attention_mask,
                    position_ids=position_ids_from_mask(attention_mask)[:, -1:],
                    use_cache=True,
                    **{cache_keyword: cache},
                )
    finally:
        model.train(was_training)

    responses = torch.stack(tokens, dim=1)  # (B, R)
    response_mask = torch.stack(valid, dim=1)  # (B, R)
    return RolloutBatch(
        input_ids=torch.cat([input_ids, responses], dim=1),
        attention_mask=torch.cat([attention_mask[:, : input_ids.shape[1]], response_mask.long()], dim=1),
        response_mask=response_mask,
        prompt_length=input_ids.shape[1],
        truncated=~finished,
        sampler_logprobs=torch.stack(logprobs, dim=1),
    )


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


def teacher_hidden_states(
    teacher: PreTrainedModel,
    batch: RolloutBatch,
    teacher_prompts: list[list[int]],
    *,
    pad_token_id: int,
    remap_end_token_ids: tuple[int, int] | None = None,
) -> Tensor:
    """The teacher's hidden states (B, R, H_t) at the response positions of a rollout, in its own format.

    The teacher reads the same response tokens behind its own prompt (`with_prompts`); with
    `remap_end_token_ids = (student_end, teacher_end)` the student's end token is replaced by the
    teacher's on that copy (PAPER.md section 3). Pair with `eopd.models.teacher_output_weight` so that the
    teacher's log-probs come out in the student's token ids.
    """
    copy = with_prompts(batch, teacher_prompts, pad_token_id=pad_token_id)
    ids = copy.input_ids
    if remap_end_token_ids is not None:
        from_id, to_id = remap_end_token_ids
        ids = remap_end_token(ids, copy.response_mask, from_id=from_id, to_id=to_id)
    return response_hidden_states(teacher, copy, input_ids=ids)
