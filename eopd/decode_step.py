"""One decoding step of a Llama/Qwen3-style decoder with less dispatch than `model(...)`, bitwise the same.

`eopd.rollout.sample` runs each new token through `direct_decode_step`: at a small model the fixed cost
of each operation is most of the decoding time (docs/performance.md), so the step skips transformers'
per-call machinery and runs each plain layer with fewer, larger operations (`fused_layer`).
`tests/test_rollout.py` holds tokens, log-probs and logits bitwise equal to the model's own forward.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from eopd.scoring import decoder_of, is_full_attention_sdpa_llama, is_peft

if TYPE_CHECKING:
    from transformers import PreTrainedModel


DecodeStep = Callable[[Tensor, Tensor, Tensor, Any], Tensor]


def direct_decode_step(
    model: PreTrainedModel, cache_keyword: str, max_positions: int | None = None
) -> DecodeStep | None:
    """One decoding step through the decoder's own modules, or None where only `model(...)` is safe.

    For a Llama/Qwen3-style decoder (embeddings, layers, final norm, rotary embedding, SDPA attention, no
    sliding layers) this runs the body of the model's `forward` for one new token per row, each layer
    through `fused_layer` where the layer is the plain kind (else through the layer module), so the
    logits are bitwise those of `model(...)`. What it skips is the per-call machinery around that body:
    building the causal mask through transformers' general mask functions, output capturing, the output
    dataclasses. For one token the causal part of the mask is all true, so the mask is the padding mask
    itself, (B, 1, 1, L) bool, or None when nothing is padded, which is what
    `transformers.masking_utils.sdpa_mask` returns. At a small model that machinery costs as much as the
    arithmetic (docs/performance.md).

    With `max_positions`, the rotary embedding's cos and sin for positions 0 .. max_positions - 1 are
    computed once, by the model's own rotary module, and each step looks its positions up: the same
    values (each is a function of its position alone), without the module's operations at every step.
    Rotary kinds that rescale with the sequence length (dynamic, longrope) are computed at every step.

    Any other model (LoRA, a device map, FSDP, another attention, older transformers) gets None, and so
    does a model with forward hooks (a probe, steering, an adapter) on any of its modules or on all
    modules: the step calls many of them as functions of their weights, which would skip the hooks.
    """
    config = getattr(model, "config", None)
    decoder = decoder_of(model)
    if (
        config is None
        or decoder is None
        or is_peft(model)
        or cache_keyword != "cache"  # transformers < 5: the layers take cache_position too
        or getattr(model, "hf_device_map", None) is not None
        or not is_full_attention_sdpa_llama(config)
        or any(type(m).__name__.startswith("FSDP") for m in (model, decoder))
        or _has_forward_hooks(model)
    ):
        return None
    parts = [getattr(decoder, name, None) for name in ("embed_tokens", "layers", "norm", "rotary_emb")]
    if any(part is None for part in parts):
        return None
    embed, layers, norm, rotary = parts
    layers = list(layers)[: config.num_hidden_layers]
    head = model.get_output_embeddings()
    fused = [fused_layer(layer, config) for layer in layers]
    if any(f is None for f in fused):
        fused = None
    table = None
    rope_type = str(getattr(rotary, "rope_type", "default"))
    if max_positions is not None and "dynamic" not in rope_type and rope_type != "longrope":
        with torch.no_grad():
            like = embed.weight[:1]  # the rotary module reads only the dtype and device of its input
            positions = torch.arange(max_positions, device=like.device)[None]
            table = torch.stack([t[0] for t in rotary(like, positions)])  # cos, sin: (2, max_positions, D)

    embed_call, head_call, final_norm = embed, head, rms_of(norm)
    # As in `fused_layer`: on the CPU, plain modules are called as their forward's function directly.
    if fused is not None and head.weight.device.type == "cpu":
        head_call = _plain_linear(head)
        if type(embed) is torch.nn.Embedding and embed.max_norm is None:
            embed_call = partial(F.embedding, weight=embed.weight, padding_idx=embed.padding_idx)

    def step(token: Tensor, attention_mask: Tensor, position_ids: Tensor, cache: Any) -> Tensor:
        hidden = embed_call(token[:, None])  # (B, 1, H)
        mask = None if bool(attention_mask.all()) else attention_mask.bool()[:, None, None, :]
        if table is not None:
            position_embeddings = table[:, position_ids].unbind()  # cos, sin: (B, 1, D) each, one gather
        else:
            position_embeddings = rotary(hidden, position_ids)
        if fused is not None:
            for layer_step in fused:
                hidden = layer_step(hidden, mask, position_embeddings, cache)
            return head_call(final_norm(hidden))
        for layer in layers:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
            )
        return head(norm(hidden))  # (B, 1, V)

    return step


def fused_layer(layer: torch.nn.Module, config: Any) -> Callable | None:
    """One Llama/Qwen3 decoder layer for one new token per row with fewer, larger operations, or None.

    The layer's own arithmetic with less dispatch: q, k and v come from one product with their weights
    stacked (and gate and up from another), and in float32 the RMSNorms run as `torch.rms_norm`, whose
    result equals transformers' five-operation RMSNorm there (in other dtypes that RMSNorm rounds
    through float32, so its module runs). Attention, the rotary embedding and the cache update are the
    model's own functions. A product with stacked weights computes every output from the same row and
    column as the separate products do. `tests/test_rollout.py` holds the logits bitwise equal to the
    module path. At a small model each operation's fixed cost is most of the decoding time
    (docs/performance.md); the stacked weights are built when sampling starts, so they are the
    current weights, and cost a copy of those matrices while it runs (CPU only; elsewhere the
    separate products run). q and k, side by side in that product, are then normed and rotated
    together: one `torch.rms_norm` without weight times the two norms' weights side by side (the same
    products as each norm's), and the model's `rotate_half` over all their heads at once. The output
    and down projections, SiLU, and on the decoder the embedding and output layers run as the
    functions their plain modules' forwards call (CPU; a subclass of Linear or Embedding is called as
    a module and is not stacked), and the norms read their weights once. Hooks are not run here:
    `direct_decode_step` leaves a hooked model to its own forward.

    None for layers that are not the plain kind: biases, another activation, tensor-parallel slicing,
    missing parts.
    """
    import sys

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    modeling = sys.modules.get(type(attention).__module__)  # the model's modeling module
    rotate = getattr(modeling, "apply_rotary_pos_emb", None)
    if (
        rotate is None
        or getattr(config, "hidden_act", None) != "silu"
        or getattr(config, "attention_bias", False)
        or getattr(config, "mlp_bias", False)
        or getattr(config, "pretraining_tp", 1) != 1
        or any(
            not isinstance(getattr(parent, name, None), torch.nn.Linear)
            for parent, name in [
                (attention, "q_proj"),
                (attention, "k_proj"),
                (attention, "v_proj"),
                (attention, "o_proj"),
                (mlp, "gate_proj"),
                (mlp, "up_proj"),
                (mlp, "down_proj"),
            ]
        )
        or any(getattr(layer, name, None) is None for name in ("input_layernorm", "post_attention_layernorm"))
    ):
        return None
    q_norm, k_norm = getattr(attention, "q_norm", None), getattr(attention, "k_norm", None)
    head_dim = attention.head_dim
    weight = attention.q_proj.weight
    widths = [attention.q_proj.out_features, attention.k_proj.out_features, attention.v_proj.out_features]
    heads = widths[0] // head_dim
    rotate_half = getattr(modeling, "rotate_half", None)
    qkv = gate_up = qk_weight = None
    # On the CPU the output and down products run straight from their weights (a plain Linear's
    # forward, without the machinery of a module call, which costs as much as a small product).
    o_proj, down_proj, act = attention.o_proj, mlp.down_proj, mlp.act_fn
    input_norm, post_attention_norm = rms_of(layer.input_layernorm), rms_of(layer.post_attention_layernorm)
    q_rms, k_rms = rms_of(q_norm), rms_of(k_norm)
    if weight.device.type == "cpu":
        o_proj = _plain_linear(attention.o_proj)
        down_proj = _plain_linear(mlp.down_proj)
        act = F.silu  # what transformers' "silu" activation module calls
        # Only exact Linear modules are stacked: a subclass's forward may not be x @ weight.T.
        projections = [attention.q_proj, attention.k_proj, attention.v_proj]
        with torch.no_grad():
            if all(type(m) is torch.nn.Linear for m in projections):
                qkv = torch.cat([m.weight for m in projections])
            if type(mlp.gate_proj) is type(mlp.up_proj) is torch.nn.Linear:
                gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            # q and k sit side by side in the stacked product: one norm and one rotation for both.
            if q_norm is not None and k_norm is not None and _same_rms(q_norm, k_norm, weight.dtype):
                qk_weight = torch.cat(
                    [
                        q_norm.weight.expand(heads, head_dim),
                        k_norm.weight.expand(widths[1] // head_dim, head_dim),
                    ]
                )
    joint = (
        qkv is not None and rotate_half is not None and (qk_weight is not None or q_norm is k_norm is None)
    )

    def attention_inputs(x: Tensor, position_embeddings) -> tuple[Tensor, Tensor, Tensor]:
        batch = x.shape[0]
        cos, sin = position_embeddings
        if joint:
            q_k, v = F.linear(x, qkv).split([widths[0] + widths[1], widths[2]], dim=-1)
            q_k = q_k.view(batch, 1, -1, head_dim)
            if qk_weight is not None:
                q_k = torch.rms_norm(q_k, (head_dim,), None, q_norm.variance_epsilon) * qk_weight
            q_k = q_k.transpose(1, 2)
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            q_k = (q_k * cos) + (rotate_half(q_k) * sin)  # apply_rotary_pos_emb, for q and k at once
            q, k = q_k[:, :heads], q_k[:, heads:]
        else:
            if qkv is not None:
                q, k, v = F.linear(x, qkv).split(widths, dim=-1)
            else:
                q, k, v = attention.q_proj(x), attention.k_proj(x), attention.v_proj(x)
            q = q_rms(q.view(batch, 1, -1, head_dim)).transpose(1, 2)
            k = k_rms(k.view(batch, 1, -1, head_dim)).transpose(1, 2)
            q, k = rotate(q, k, cos, sin)
        return q, k, v.view(batch, 1, -1, head_dim).transpose(1, 2)

    def layer_step(hidden: Tensor, mask: Tensor | None, position_embeddings, cache: Any) -> Tensor:
        batch = hidden.shape[0]
        q, k, v = attention_inputs(input_norm(hidden), position_embeddings)
        k, v = cache.update(k, v, attention.layer_idx)
        out, _ = sdpa_attention_forward(attention, q, k, v, mask, dropout=0.0, scaling=attention.scaling)
        hidden = hidden + o_proj(out.reshape(batch, 1, -1))
        x = post_attention_norm(hidden)
        if gate_up is not None:
            gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
        else:
            gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        return hidden + down_proj(act(gate) * up)

    return layer_step


def _has_forward_hooks(model: torch.nn.Module) -> bool:
    """Whether a forward hook or pre-hook is registered on any module of `model` or on all modules."""
    from torch.nn.modules import module as modules

    if modules._global_forward_hooks or modules._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def _plain_linear(module: torch.nn.Linear) -> Callable[[Tensor], Tensor]:
    """`module`'s forward as a function of its current weight and bias; a subclass of Linear, whose
    forward may compute something else from them (quantised weights, say), stays a module call."""
    if type(module) is not torch.nn.Linear:
        return module
    return partial(F.linear, weight=module.weight, bias=module.bias)


def rms_of(module: torch.nn.Module | None) -> Callable[[Tensor], Tensor]:
    """An RMSNorm module as a function, its weight and epsilon read once: in float32 `torch.rms_norm`,
    equal to the module's result there (`fused_layer`); otherwise the module. None: the identity."""
    if module is None:
        return lambda x: x
    weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    if weight is None or eps is None:
        return module

    def norm(x: Tensor) -> Tensor:
        if x.dtype == torch.float32:
            return torch.rms_norm(x, (x.shape[-1],), weight, eps)
        return module(x)

    return norm


def _same_rms(a: torch.nn.Module, b: torch.nn.Module, dtype: torch.dtype) -> bool:
    """Whether two RMSNorms compute as `torch.rms_norm` with the same epsilon (float32; see `fused_layer`)."""
    eps = [getattr(m, "variance_epsilon", None) for m in (a, b)]
    return dtype == torch.float32 and eps[0] is not None and eps[0] == eps[1]
