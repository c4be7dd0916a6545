"""On-policy rollouts: a KV-cached sampling loop that returns a `RolloutBatch` (`eopd.batch`)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from eopd.batch import RolloutBatch, pad_prompts
from eopd.decode_step import direct_decode_step
from eopd.scoring import position_ids_from_mask

if TYPE_CHECKING:  # transformers' modeling code takes seconds to import; only types are needed here
    from transformers import DynamicCache, PreTrainedModel


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
    scaled = logits if temperature == 1 else logits / temperature  # x / 1 is x: one operation fewer
    logprobs = torch.log_softmax(scaled, dim=-1)  # (B, V)
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
    # torch.multinomial's draw of one sample (ATen's path for it): the argmax of p / q with q ~ Exp(1),
    # from the same generator, so the same tokens; without its checks of the probabilities (several
    # reductions and synchronisations at every step). A NaN or infinite logit leaves the drawn token a
    # non-finite log-probability, which `sample` checks once its loop is over (`_check_finite`).
    probs = logprobs.exp()
    race = torch.empty_like(probs).exponential_(generator=generator)
    tokens = torch.div(probs, race, out=race).argmax(dim=-1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


def _check_finite(drawn: Tensor) -> None:
    """Raise, naming the rows, where a draw's log-probability is not finite: the logits held NaN or inf."""
    if not bool(torch.isfinite(drawn).all()):
        raise ValueError(
            "sampling met non-finite logits (NaN or inf) in rows "
            f"{(~torch.isfinite(drawn)).any(dim=-1).nonzero().flatten().tolist()}: the model's weights or "
            "inputs hold NaN or inf"
        )


def _forward_keywords(model: PreTrainedModel) -> tuple[str, bool]:
    """The model's name for the KV cache argument and whether it accepts `logits_to_keep`.

    A wrapper that forwards `**kwargs` (a peft `PeftModel` around a LoRA student) is asked about the model
    it wraps: its own signature names neither argument.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    parameters = inspect.signature(inner.forward).parameters
    # transformers 5 renamed `past_key_values` to `cache` (the old name warns, and goes in 5.40).
    cache_keyword = "cache" if "cache" in parameters else "past_key_values"
    return cache_keyword, "logits_to_keep" in parameters


def _new_cache(model: PreTrainedModel, capacity: int) -> DynamicCache:
    """A `DynamicCache` whose full-attention layers write into storage reserved for `capacity` positions.

    transformers' `DynamicLayer` concatenates every new key and value onto the whole cache, so decoding R
    tokens copies O(R^2) cache entries: at 64 rows x 128 new tokens that copying was most of the sampler's
    time (docs/performance.md). The reserved layers hold the same keys and values, as views of the first
    `length` positions of their storage, so attention sees tensors of the same shapes and values.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    try:
        cache = DynamicCache(config=model.config)
    except TypeError:  # older transformers: no config argument
        return DynamicCache()
    layers = getattr(cache, "layers", None)
    if layers:
        for index, layer in enumerate(layers):
            if type(layer) is DynamicLayer:  # sliding-window and other layer kinds keep their own
                layers[index] = _reserved_layer_class()(capacity)
    return cache


_RESERVED_LAYER: type | None = None


def _reserved_layer_class() -> type:
    """`DynamicLayer` with reserved storage, defined on first use (transformers imports slowly)."""
    global _RESERVED_LAYER
    if _RESERVED_LAYER is not None:
        return _RESERVED_LAYER
    from transformers.cache_utils import DynamicLayer

    class ReservedLayer(DynamicLayer):
        """Keys and values are views of the first `length` positions of (B, heads, capacity, D) storage.

        `update` copies the new positions into place instead of concatenating; past the capacity the
        storage doubles (one copy). Only `update` and the read methods are used by the sampler.
        """

        def __init__(self, capacity: int) -> None:
            super().__init__()
            self.capacity = capacity
            self.storage: tuple[Tensor, Tensor] | None = None

        def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            start = self.get_seq_length()
            end = start + key_states.shape[-2]
            if self.storage is None or end > self.storage[0].shape[-2]:
                size = max(end, self.capacity if self.storage is None else 2 * self.storage[0].shape[-2])
                self.storage = tuple(
                    torch.empty((*new.shape[:-2], size, new.shape[-1]), dtype=new.dtype, device=new.device)
                    for new in (key_states, value_states)
                )
                if start:
                    self.storage[0][..., :start, :].copy_(self.keys)
                    self.storage[1][..., :start, :].copy_(self.values)
            keys, values = self.storage
            keys[..., start:end, :].copy_(key_states)
            values[..., start:end, :].copy_(value_states)
            self.keys, self.values = keys[..., :end, :], values[..., :end, :]
            return self.keys, self.values

        def batch_select_indices(self, indices: Tensor) -> None:
            """Keep the rows `indices` (in that order), in storage of the same capacity."""
            if self.storage is None:
                return
            end = self.get_seq_length()
            self.storage = tuple(
                torch.empty((len(indices), *old.shape[1:]), dtype=old.dtype, device=old.device)
                for old in self.storage
            )
            self.storage[0][..., :end, :].copy_(self.keys[indices])
            self.storage[1][..., :end, :].copy_(self.values[indices])
            self.keys, self.values = self.storage[0][..., :end, :], self.storage[1][..., :end, :]

    _RESERVED_LAYER = ReservedLayer
    return ReservedLayer


def _prefill(model, prompts, input_ids, attention_mask, cache, cache_keyword: str, extra: dict) -> Tensor:
    """Run the prompts into `cache`; the last position's logits, (B, V_model).

    n samples of one prompt (adjacent rows) share one prefill: its keys and values are copied to each
    row of the run, which then decodes alone.
    """
    first, run_of = (
        _repeated_rows(prompts, input_ids.device) if hasattr(cache, "batch_select_indices") else (None, None)
    )
    rows = slice(None) if first is None else first
    out = model(
        input_ids=input_ids[rows],
        attention_mask=attention_mask[rows],
        position_ids=position_ids_from_mask(attention_mask[rows]),
        use_cache=True,
        **{cache_keyword: cache},
        **extra,
    )
    logits = out.logits[:, -1]
    if run_of is None:
        return logits
    cache.batch_select_indices(run_of)
    return logits[run_of]


def _repeated_rows(prompts: list[list[int]], device: torch.device) -> tuple[Tensor | None, Tensor | None]:
    """Rows whose prompt repeats the previous row's: (first row of each run, run index of every row).

    (None, None) when no prompt repeats its predecessor, so that every row is prefilled as before.
    """
    runs = [0]
    for index in range(1, len(prompts)):
        runs.append(runs[-1] + (prompts[index] != prompts[index - 1]))
    if runs[-1] == len(prompts) - 1:
        return None, None
    firsts = [index for index in range(len(prompts)) if index == 0 or runs[index] != runs[index - 1]]
    return torch.tensor(firsts, device=device), torch.tensor(runs, device=device)


def _should_drop(ended: int, batch_size: int, decoding: Tensor | None) -> bool:
    """Drop the ended rows from the model's batch once they are a quarter of it or more.

    `ended` of the `batch_size` rows have ended; those outside `decoding` (the rows the model still
    computes, None for all) left it earlier, ended. Each drop copies the cache of the rows that stay,
    so dropping at every end would copy it up to B times; waiting for a quarter bounds the copying by
    a few times the cache while the model computes at most a third more rows than are still decoding.
    """
    rows = batch_size if decoding is None else len(decoding)
    ended_in_batch = ended - (batch_size - rows)
    return ended_in_batch > 0 and 4 * ended_in_batch >= rows


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
    `eopd.scoring.final_hidden_states` computes them, so scoring the returned batch sees the positions
    the sampler saw. Rows that have ended receive `pad_token_id`, masked out, and leave the model's batch
    once they are a quarter of it (`_should_drop`); the loop stops when every row has ended. The model
    runs in eval mode under `torch.inference_mode()` and gets its mode back afterwards.

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

    direct_step = direct_decode_step(model, cache_keyword, input_ids.shape[1] + max_new_tokens)
    batch_size = input_ids.shape[0]
    finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
    tokens, valid, drawn = [], [], []
    was_training = model.training
    model.eval()
    try:
        # Inference mode rather than no_grad: the same arithmetic with less bookkeeping per operation
        # (no version counters or view tracking), which is a tenth of a small model's decoding time
        # (docs/performance.md). Tensors made here are inference tensors; what leaves the function is
        # built outside the block below by stack and cat, which return ordinary tensors, so the batch
        # can be used by autograd (saved for backward) like any other.
        with torch.inference_mode():
            cache = _new_cache(model, input_ids.shape[1] + max_new_tokens)
            # Every row is drawn from at every step, ended or not, so that the random stream (one
            # exponential per row and id in torch.multinomial) is the same whichever rows the model
            # still computes; an ended row keeps its last logits, and its draw is discarded.
            next_logits = _prefill(
                model, prompts, input_ids, attention_mask, cache, cache_keyword, prefill_extra
            )
            next_logits = next_logits[:, :vocab_size].float()  # (B, V)
            prompt_length = input_ids.shape[1]
            # The mask of prompts and responses so far: the first columns of storage for every position
            # the loop can reach, written one column per step.
            masks = attention_mask.new_zeros((batch_size, prompt_length + max_new_tokens))
            masks[:, :prompt_length] = attention_mask
            # Each row's position of its latest attended token (prompts are not empty: never below 0).
            # Advanced below by each valid draw, it is the position of the token the step feeds, the last
            # column of position_ids_from_mask over the mask so far, as scoring will compute it.
            positions = attention_mask.sum(dim=1) - 1
            decoding: Tensor | None = None  # the rows in the model's batch and cache; None: every row
            can_drop = hasattr(cache, "batch_select_indices")
            for step in range(max_new_tokens):
                token, logprob = _draw(
                    next_logits, temperature=temperature, top_p=top_p, generator=generator
                )  # (B,) each
                is_valid = ~finished
                tokens.append(token.masked_fill_(finished, pad_token_id))
                valid.append(is_valid)
                drawn.append(logprob)
                finished |= torch.isin(token, eos)  # a pad equal to an end id leaves ended rows ended
                ended = int(finished.sum())
                if step == max_new_tokens - 1 or ended == batch_size:
                    break
                # Padding after a row's end is masked, as in the returned batch, so that the positions
                # below are the ones scoring will compute.
                masks[:, prompt_length + step] = is_valid
                step_mask = masks[:, : prompt_length + step + 1]
                positions += is_valid
                if can_drop and _should_drop(ended, batch_size, decoding):
                    # Ended rows leave the model's batch, their keys and values too. The rows that stay
                    # compute what they did, up to the last bits where a kernel divides its work by batch
                    # size (CPU attention over 2 threads does).
                    rows = torch.arange(batch_size, device=device) if decoding is None else decoding
                    keep = (~finished[rows]).nonzero().squeeze(-1)
                    cache.batch_select_indices(keep)
                    decoding = rows[keep]
                if decoding is None:
                    step_token, position_ids = token, positions[:, None]
                else:
                    step_token, step_mask = token[decoding], step_mask[decoding]
                    position_ids = positions[decoding][:, None]
                if direct_step is not None:
                    logits = direct_step(step_token, step_mask, position_ids, cache)
                else:
                    logits = model(
                        input_ids=step_token[:, None],
                        attention_mask=step_mask,
                        position_ids=position_ids,
                        use_cache=True,
                        **{cache_keyword: cache},
                    ).logits
                if decoding is None:
                    next_logits = logits[:, -1, :vocab_size].float()
                else:
                    next_logits[decoding] = logits[:, -1, :vocab_size].float()
    finally:
        model.train(was_training)

    draws = torch.stack(drawn, dim=1)  # (B, R): every row's draws, an ended row's discarded ones too
    _check_finite(draws)
    responses = torch.stack(tokens, dim=1)  # (B, R)
    response_mask = torch.stack(valid, dim=1)  # (B, R)
    return RolloutBatch(
        input_ids=torch.cat([input_ids, responses], dim=1),
        attention_mask=torch.cat([attention_mask, response_mask.long()], dim=1),
        response_mask=response_mask,
        prompt_length=input_ids.shape[1],
        truncated=~finished,
        sampler_logprobs=draws.masked_fill(~response_mask, 0.0),
    )
