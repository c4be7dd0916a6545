"""Tiny GGUF files for tests: a Llama model and a byte-level BPE tokenizer written as llama.cpp lays them out."""

import json
from pathlib import Path

import gguf
import numpy as np
import torch

from eopd.models import build_causal_lm
from eopd.tasks.hub_formats import build_family_tokenizer

TINY = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)

# A minimal ChatML template, ending each turn with <|im_end|> (SmolLM2-Instruct's format).
CHATML = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# HF parameter names -> llama.cpp's tensor names (gguf.constants.TENSOR_NAMES for MODEL_ARCH.LLAMA).
GGUF_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
}
GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def chatml_tokenizer():
    """A byte-level BPE tokenizer (256 byte symbols, a few merges, then <|endoftext|>, <|im_start|>,
    <|im_end|> special and <think>, </think> plain added tokens) with CHATML, ending with <|im_end|>."""
    tokenizer = build_family_tokenizer("qwen3", eos_token="<|im_end|>")
    tokenizer.bos_token = "<|im_start|>"
    tokenizer.chat_template = CHATML
    return tokenizer


def tiny_llama(tokenizer, *, tied: bool = False, seed: int = 0):
    return build_causal_lm(
        family="llama", vocab_size=len(tokenizer), tie_word_embeddings=tied, seed=seed, **TINY
    ).eval()


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute`: HF's rotate-half q/k rows -> interleaved pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def gguf_tensor_name(hf_name: str) -> str:
    module, suffix = hf_name.rsplit(".", 1)
    if module.startswith("model.layers."):
        block, inner = module.removeprefix("model.layers.").split(".", 1)
        return f"blk.{block}.{GGUF_LAYER_NAMES[inner]}.{suffix}"
    return f"{GGUF_NAMES[module]}.{suffix}"


def write_tiny_gguf(path, model, tokenizer) -> Path:
    """Write a Llama `model` and its byte-level BPE `tokenizer` into a GGUF file as llama.cpp's
    convert_hf_to_gguf.py does (metadata keys, tensor names, q/k permutation, no output.weight when tied),
    every tensor in F32 so that reading it back is exact."""
    path = Path(path)
    config = model.config
    writer = gguf.GGUFWriter(path, arch="llama")  # general.architecture
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(config.head_dim)

    # The vocabulary: every id in order, typed as llama.cpp's get_vocab_base types it.
    added = tokenizer.added_tokens_decoder
    tokens = tokenizer.convert_ids_to_tokens(list(range(config.vocab_size)))
    token_types = [
        gguf.TokenType.NORMAL
        if index not in added
        else gguf.TokenType.CONTROL
        if added[index].special
        else gguf.TokenType.USER_DEFINED
        for index in range(config.vocab_size)
    ]
    merges = [" ".join(pair) for pair in json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    # gguf.SpecialVocab's part: merges, special token ids and the chat template.
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(tokenizer.chat_template)

    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp writes no output.weight for tied embeddings
        data = tensor.detach().to(torch.float32).numpy()
        if name.endswith("self_attn.q_proj.weight"):
            data = llama_cpp_permute(data, heads, heads)
        elif name.endswith("self_attn.k_proj.weight"):
            data = llama_cpp_permute(data, heads, kv_heads)
        writer.add_tensor(gguf_tensor_name(name), np.ascontiguousarray(data))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
