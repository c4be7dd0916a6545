"""Scoring a rollout: hidden states, output layers and logits at the response positions, the end-token remap.

Both models are scored the same way: position ids from the attention mask, hidden states after the final
norm at the positions that predict each response token, then the output layer (tile by tile in the
objective, never full (B, R, V) logits at a real vocabulary). The teacher reads its own copy of the rollout
(its prompt format, the student's end token replaced by its own) through `teacher_hidden_states` and
`teacher_output_weight`.
"""

from __future__ import annotations

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


def final_hidden_states(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The last hidden states after the final norm: what the output layer multiplies.

    Position ids come from the attention mask (`position_ids_from_mask`), so a left-padded sequence gets
    the same hidden states at its real tokens as the same sequence unpadded, and the same positions as
    `eopd.rollout.sample` used when it drew the tokens.

    Args:
        model: a causal LM.
        input_ids: (B, L) token ids.
        attention_mask: (B, L) 1 for real tokens, 0 for padding.

    Returns:
        (B, L, H) in the model's dtype. Values at padded positions are meaningless.
    """
    position_ids = position_ids_from_mask(attention_mask)
    decoder = decoder_of(model)
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
    model: PreTrainedModel, batch: RolloutBatch, *, input_ids: Tensor | None = None
) -> Tensor:
    """Hidden states at the positions that predict each response token.

    Response token r sits at position P + r of the full sequence and is predicted from position
    P + r - 1, so this returns positions P - 1 ... P + R - 2.

    Args:
        model: a causal LM (student or teacher).
        batch: the rollout to score.
        input_ids: (B, P + R) ids to score instead of `batch.input_ids`, e.g. the teacher's copy from
            `remap_end_token`; the batch's attention mask is used either way.

    Returns:
        (B, R, H); rows where `batch.response_mask` is False are meaningless.
    """
    ids = batch.input_ids if input_ids is None else input_ids
    if ids.shape != batch.input_ids.shape:
        raise ValueError(f"input_ids has shape {tuple(ids.shape)}, the batch {tuple(batch.input_ids.shape)}")
    hidden = final_hidden_states(model, ids, batch.attention_mask)  # (B, P + R, H)
    start = batch.prompt_length - 1
    return hidden[:, start : start + batch.response_mask.shape[1]]


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
) -> Tensor:
    """The teacher's hidden states (B, R, H_t) at the response positions of a rollout, in its own format.

    The teacher reads the same response tokens behind its own prompt (`with_prompts`); with
    `remap_end_token_ids = (student_end, teacher_end)` the student's end token is replaced by the
    teacher's on that copy (PAPER.md section 3). Pair with `teacher_output_weight` so that the
    teacher's log-probs come out in the student's token ids.
    """
    copy = with_prompts(batch, teacher_prompts, pad_token_id=pad_token_id)
    ids = copy.input_ids
    if remap_end_token_ids is not None:
        from_id, to_id = remap_end_token_ids
        ids = remap_end_token(ids, copy.response_mask, from_id=from_id, to_id=to_id)
    return response_hidden_states(teacher, copy, input_ids=ids)
