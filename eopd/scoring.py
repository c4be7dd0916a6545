"""Scoring a rollout: hidden states, output layers and logits at the response positions, the end-token remap.

Both models are scored the same way: position ids from the attention mask, hidden states after the final
norm at the positions that predict each response token, then the output layer (tile by tile in the
objective, never full (B, R, V) logits at a real vocabulary). The teacher reads its own copy of the rollout
(its prompt format, the student's end token replaced by its own) through `teacher_hidden_states` and
`teacher_output_weight`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from eopd.batch import RolloutBatch, with_prompts

if TYPE_CHECKING:  # transformers' modeling code takes seconds to import; only the type is needed here
    from transformers import PreTrainedModel


def remap_end_token(input_ids: Tensor, response_mask: Tensor, *, from_id: int, to_id: int) -> Tensor:
    """Replace the student's end token by the teacher's inside the response, on a copy.

    A base-model student ends its answers with `<|endoftext|>`, while a chat teacher ends them with
    `<|im_end|>`; scored as is, the teacher finds the student's end token unlikely and the student learns
    never to stop (PAPER.md section 3). The teacher should therefore score a copy in which the end token
    is translated. Prompt tokens and padding are left alone, even when the pad id equals `from_id`.

    Args:
        input_ids: (B, P + R) prompts followed by responses, or (B, R) responses alone.
        response_mask: (B, R) bool, True on response tokens (the last R columns of `input_ids`).
        from_id: the student's end token id.
        to_id: the teacher's end token id.

    Returns:
        (B, P + R) a new tensor; `input_ids` is not modified.
    """
    if input_ids.dim() != 2 or response_mask.dim() != 2:
        raise ValueError(
            f"input_ids and response_mask must be 2-D, got shapes {tuple(input_ids.shape)} and "
            f"{tuple(response_mask.shape)}"
        )
    batch_size, response_length = response_mask.shape
    if input_ids.shape[0] != batch_size or input_ids.shape[1] < response_length:
        raise ValueError(
            f"response_mask {tuple(response_mask.shape)} does not fit the last columns of input_ids "
            f"{tuple(input_ids.shape)}"
        )
    remapped = input_ids.clone()
    responses = remapped[:, input_ids.shape[1] - response_length :]  # a view into the copy
    responses[(responses == from_id) & response_mask.bool()] = to_id
    return remapped


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids that count only attended tokens, so left padding does not shift positions.

    Args:
        attention_mask: (B, L) 1 for real tokens, 0 for padding.

    Returns:
        (B, L) long: `cumsum - 1` over the mask, 0 on left padding.
    """
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp_min(0)


def output_weight(model: PreTrainedModel) -> Tensor:
    """The output layer's weight, (V, H): logits are `hidden_states @ output_weight(model).T`."""
    return model.get_output_embeddings().weight


def decoder_of(model: PreTrainedModel) -> torch.nn.Module | None:
    if is_peft(model):  # a LoRA student: the adapters sit inside the wrapped model's decoder
        model = model.get_base_model()
    # Llama/Qwen3-style causal LMs keep the decoder (embeddings, layers, final norm) in `.model`.
    decoder = getattr(model, "model", None)
    if isinstance(decoder, torch.nn.Module):
        return decoder
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    return decoder if isinstance(decoder, torch.nn.Module) and decoder is not model else None


def decoder_layers(model: PreTrainedModel) -> list[torch.nn.Module]:
    """The transformer blocks of a causal LM, in order (empty when the architecture keeps them elsewhere)."""
    layers = getattr(decoder_of(model), "layers", None)
    return list(layers) if isinstance(layers, torch.nn.ModuleList) else []


def packable(model: PreTrainedModel) -> bool:
    """Whether `final_hidden_states` may run this model on packed rows with a block-diagonal mask.

    Llama/Qwen3-style decoders with SDPA attention and no sliding-window layers: their mask functions
    take a prepared (B, 1, L, L) mask as it is, SDPA reads a bool one, and nothing else in them reads
    the row layout. Eager attention adds the mask to the scores, so it would need an additive mask;
    flash-attention kernels take packed rows through position ids instead (not done here).
    """
    config = getattr(model.get_base_model() if is_peft(model) else model, "config", None)
    return decoder_of(model) is not None and is_full_attention_sdpa_llama(config)


def is_full_attention_sdpa_llama(config) -> bool:
    """A Llama/Qwen3 config with SDPA attention and only full-attention layers (none sliding).

    The shape of decoder whose layers `eopd.scoring` packs and `eopd.rollout` runs directly.
    """
    return (
        config is not None
        and getattr(config, "model_type", None) in ("qwen3", "llama")
        and getattr(config, "_attn_implementation", None) == "sdpa"
        and all(kind == "full_attention" for kind in getattr(config, "layer_types", None) or ())
    )


MIN_SAVING = 0.2  # pack only when that computes at least a fifth fewer positions


@dataclass(frozen=True)
class Packing:
    """Where each real token of a padded (B, L) batch sits in packed (N, C) rows.

    Sequences (the real tokens of each row, in order) are placed whole, longest first, into the first
    packed row with room (first-fit decreasing), so N <= B rows of C = the longest sequence hold them.
    Attention stays inside each sequence through a block-diagonal causal mask; every packed position
    after the last sequence of its row attends to itself only, so no row of the mask is empty.

    Attributes:
        rows, columns: (T,) where each real token sits in the padded batch.
        offsets: (T,) its position in its sequence, 0 .. n - 1: its position id.
        packed_rows, packed_columns: (T,) where it sits in the packed rows.
        shape: (N, C).
    """

    rows: Tensor
    columns: Tensor
    offsets: Tensor
    packed_rows: Tensor
    packed_columns: Tensor
    shape: tuple[int, int]

    @staticmethod
    def plan(attention_mask: Tensor) -> Packing | None:
        """The packing of a (B, L) mask, or None where it would save less than `MIN_SAVING` of the positions.

        Packing has a fixed cost (the plan, the gathers, the block mask, their backward): at the embedded
        default, 8 rows of 40 packed into 8 rows of 38, the student's forward and backward took 26.5 ms
        packed against 24.4 ms padded (docs/performance.md), so small savings are left alone.
        """
        real = attention_mask.bool()
        lengths = real.sum(dim=1).tolist()
        capacity = max(lengths, default=0)
        if capacity == 0:
            return None
        room: list[int] = []  # free positions left in each packed row
        start: list[tuple[int, int]] = [(0, 0)] * len(lengths)  # (packed row, first column) per sequence
        for row in sorted(range(len(lengths)), key=lambda r: (-lengths[r], r)):
            target = next((i for i, free in enumerate(room) if free >= lengths[row]), len(room))
            if target == len(room):
                room.append(capacity)
            start[row] = (target, capacity - room[target])
            room[target] -= lengths[row]
        if len(room) * capacity > (1 - MIN_SAVING) * real.numel():
            return None
        rows, columns = real.nonzero(as_tuple=True)  # row-major: each row's real tokens in order
        offsets = position_ids_from_mask(attention_mask)[rows, columns]  # 0 .. n - 1 in each sequence
        starts = torch.as_tensor(start, device=attention_mask.device).reshape(-1, 2)
        return Packing(
            rows=rows,
            columns=columns,
            offsets=offsets,
            packed_rows=starts[rows, 0],
            packed_columns=starts[rows, 1] + offsets,
            shape=(len(room), capacity),
        )

    def pack(self, values: Tensor, fill: int | float = 0) -> Tensor:
        """(B, L, ...) -> (N, C, ...), `fill` where no sequence sits."""
        packed = values.new_full((*self.shape, *values.shape[2:]), fill)
        packed[self.packed_rows, self.packed_columns] = values[self.rows, self.columns]
        return packed

    def unpack(self, packed: Tensor, like: Tensor) -> Tensor:
        """(N, C, ...) -> (B, L, ...) shaped as `like` with zeros at padding; differentiable."""
        out = packed.new_zeros((*like.shape[:2], *packed.shape[2:]))
        return out.index_put((self.rows, self.columns), packed[self.packed_rows, self.packed_columns])

    def position_ids_and_mask(self) -> tuple[Tensor, Tensor]:
        """Position ids (N, C), counting from 0 in each sequence, and the (N, 1, C, C) bool mask."""
        device = self.rows.device
        sequence = torch.full(self.shape, -1, dtype=torch.long, device=device)
        sequence[self.packed_rows, self.packed_columns] = self.rows
        positions = torch.zeros(self.shape, dtype=torch.long, device=device)
        positions[self.packed_rows, self.packed_columns] = self.offsets
        # Unused tail positions get a sequence of their own each, so they attend to themselves only.
        columns = torch.arange(self.shape[1], device=device)
        sequence = torch.where(sequence < 0, -2 - columns.expand_as(sequence), sequence)
        same = sequence[:, :, None] == sequence[:, None, :]
        causal = columns[None, :, None] >= columns[None, None, :]
        return positions, (same & causal)[:, None]


def final_hidden_states(
    model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, *, pack: bool = False
) -> Tensor:
    """The last hidden states after the final norm: what the output layer multiplies.

    Position ids come from the attention mask (`position_ids_from_mask`), so a left-padded sequence gets
    the same hidden states at its real tokens as the same sequence unpadded, and the same positions as
    `eopd.rollout.sample` used when it drew the tokens.

    With `pack=True` (and a `packable` model) the real tokens of all rows are first packed into fewer,
    fuller rows (`Packing`) where that computes at least `MIN_SAVING` fewer positions. The result is the
    same up to floating-point rounding (the products and the attention run over other shapes).

    Args:
        model: a causal LM.
        input_ids: (B, L) token ids.
        attention_mask: (B, L) 1 for real tokens, 0 for padding.
        pack: pack the rows first where that saves positions.

    Returns:
        (B, L, H) in the model's dtype. Values at padded positions are meaningless.
    """
    decoder = decoder_of(model)
    packing = Packing.plan(attention_mask) if pack and packable(model) else None
    if packing is not None:
        positions, mask = packing.position_ids_and_mask()
        out = decoder(
            input_ids=packing.pack(input_ids),
            attention_mask=mask,
            position_ids=positions,
            use_cache=False,
        )
        return packing.unpack(out.last_hidden_state, input_ids)
    position_ids = position_ids_from_mask(attention_mask)
    if decoder is not None:
        out = decoder(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        return out.last_hidden_state
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        output_hidden_states=True,
    )
    return out.hidden_states[-1]


def response_hidden_states(
    model: PreTrainedModel, batch: RolloutBatch, *, input_ids: Tensor | None = None, pack: bool = False
) -> Tensor:
    """Hidden states at the positions that predict each response token.

    Response token r sits at position P + r of the full sequence and is predicted from position
    P + r - 1, so this returns positions P - 1 ... P + R - 2.

    Args:
        model: a causal LM (student or teacher).
        batch: the rollout to score.
        input_ids: (B, P + R) ids to score instead of `batch.input_ids`, e.g. the teacher's copy from
            `remap_end_token`; the batch's attention mask is used either way.
        pack: run the decoder on packed rows (`final_hidden_states`).

    Returns:
        (B, R, H); rows where `batch.response_mask` is False are meaningless.
    """
    ids = batch.input_ids if input_ids is None else input_ids
    if ids.shape != batch.input_ids.shape:
        raise ValueError(f"input_ids has shape {tuple(ids.shape)}, the batch {tuple(batch.input_ids.shape)}")
    hidden = final_hidden_states(model, ids, batch.attention_mask, pack=pack)  # (B, P + R, H)
    start = batch.prompt_length - 1
    return hidden[:, start : start + batch.response_mask.shape[1]]


def response_hidden_states_shared_prompts(
    model: PreTrainedModel, batch: RolloutBatch, *, input_ids: Tensor | None = None, pack: bool = False
) -> Tensor:
    """`response_hidden_states`, with each run of rows that repeat one prompt (n samples) reading it once.

    The prompt of a run is computed once, its keys and values copied to every row of the run, and only
    the responses are computed after it: at 8 samples of a 70-token prompt and 20-token responses, a
    third of the positions. The result equals `response_hidden_states` up to floating-point rounding.
    Without repeated prompts, or for a model this cannot run (`packable`), it is `response_hidden_states`
    itself (`pack` is passed on). Meant for evaluation: no gradient flows through the copied prompts.
    """
    ids = batch.input_ids if input_ids is None else input_ids
    prompt, mask = ids[:, : batch.prompt_length], batch.attention_mask[:, : batch.prompt_length]
    runs = torch.ones(len(ids), dtype=torch.long, device=ids.device)
    runs[1:] = ((prompt[1:] != prompt[:-1]) | (mask[1:] != mask[:-1])).any(dim=1).long()
    decoder = decoder_of(model)
    if not packable(model) or int(runs.sum()) == len(ids) or batch.response_mask.shape[1] < 2:
        return response_hidden_states(model, batch, input_ids=input_ids, pack=pack)
    from transformers import DynamicCache

    firsts = runs.nonzero().squeeze(-1)
    rows = runs.cumsum(0) - 1  # each row's run
    try:
        cache = DynamicCache(config=model.config)
    except TypeError:  # older transformers: no config argument
        cache = DynamicCache()
    # transformers 5 renamed `past_key_values` to `cache` (the old name warns, and goes in 5.40).
    keyword = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
    head = decoder(
        input_ids=prompt[firsts],
        attention_mask=mask[firsts],
        position_ids=position_ids_from_mask(mask[firsts]),
        use_cache=True,
        **{keyword: cache},
    ).last_hidden_state  # (runs, P, H)
    cache.batch_select_indices(rows)
    tail = decoder(
        input_ids=ids[:, batch.prompt_length : -1],
        attention_mask=batch.attention_mask[:, :-1],
        position_ids=position_ids_from_mask(batch.attention_mask)[:, batch.prompt_length : -1],
        use_cache=True,
        **{keyword: cache},
    ).last_hidden_state  # (B, R - 1, H)
    return torch.cat([head[rows, -1:], tail], dim=1)  # positions P - 1 ... P + R - 2


def response_logits(
    model: PreTrainedModel, batch: RolloutBatch, *, input_ids: Tensor | None = None
) -> Tensor:
    """Logits for every response token, (B, R, V): only for small vocabularies (tests, toy tasks).

    At a 150k vocabulary, (B, R, V) does not fit; compute from `response_hidden_states` and
    `output_weight` in chunks instead. Arguments are those of `response_hidden_states`.
    """
    hidden = response_hidden_states(model, batch, input_ids=input_ids)
    return model.get_output_embeddings()(hidden)


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def teacher_output_weight(teacher: PreTrainedModel, remap: tuple[int, int] | None = None) -> Tensor:
    """The teacher's output weight (V, H), with the rows of the two end tokens swapped when remapped.

    With `remap = (student_end, teacher_end)` the teacher's logit for its own end token lands at the
    student's end-token id (and the other way round), so teacher log-probs, entropies, top-k indices and
    full distributions are all in the student's token ids: the student's end token is scored as the
    teacher's end token, which is what the end-token remap means (PAPER.md section 3).
    """
    weight = output_weight(teacher)
    if remap is None or remap[0] == remap[1]:
        return weight
    order = torch.arange(weight.shape[0], device=weight.device)
    order[remap[0]], order[remap[1]] = remap[1], remap[0]
    return weight.index_select(0, order)


def teacher_hidden_states(
    teacher: PreTrainedModel,
    batch: RolloutBatch,
    teacher_prompts: list[list[int]],
    *,
    pad_token_id: int,
    remap_end_token_ids: tuple[int, int] | None = None,
    pack: bool = False,
    share_prompts: bool = False,
) -> Tensor:
    """The teacher's hidden states (B, R, H_t) at the response positions of a rollout, in its own format.

    The teacher reads the same response tokens behind its own prompt (`with_prompts`); with
    `remap_end_token_ids = (student_end, teacher_end)` the student's end token is replaced by the
    teacher's on that copy (PAPER.md section 3); `pack` as in `final_hidden_states`; `share_prompts` reads
    each run of repeated prompts once (`response_hidden_states_shared_prompts`, evaluation). Pair with
    `teacher_output_weight` so that the teacher's log-probs come out in the student's token ids.
    """
    copy = with_prompts(batch, teacher_prompts, pad_token_id=pad_token_id)
    ids = copy.input_ids
    if remap_end_token_ids is not None:
        from_id, to_id = remap_end_token_ids
        ids = remap_end_token(ids, copy.response_mask, from_id=from_id, to_id=to_id)
    score = response_hidden_states_shared_prompts if share_prompts else response_hidden_states
    return score(teacher, copy, input_ids=ids, pack=pack)
