"""Tiny models saved in the Qwen3 and Llama 3 hub formats, with family-style tokenizers built offline.

A real pair is loaded with `AutoTokenizer` / `AutoModelForCausalLM.from_pretrained(path)`. These builders
write directories that load through exactly that path (config.json with model_type qwen3 or llama,
safetensors weights, tokenizer.json and tokenizer_config.json with the chat template), so tests and smoke
runs exercise the real-pair code without a download:

    from eopd.tasks.hub_formats import save_tiny_model
    save_tiny_model("outputs/tiny/qwen3_chat", "qwen3", eos_token="<|im_end|>")
    save_tiny_model("outputs/tiny/qwen3_base", "qwen3", eos_token="<|endoftext|>")
    python -m eopd.train pair=qwen3_8b_to_qwen3_0.6b_base \
        pair.teacher.path=outputs/tiny/qwen3_chat pair.student.path=outputs/tiny/qwen3_base trainer=cpu

The tokenizer is byte-level BPE (any text round-trips) over the 256 byte symbols plus a few fixed merges,
followed by the family's special tokens, as in the real vocabularies (regular tokens first, then the
added tokens). The chat templates are written from the families' documented formats:

    Qwen3:   <|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>assistant\\n
             with enable_thinking=False the assistant turn opens with an empty <think>\\n\\n</think>\\n\\n block
    Llama 3: <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n{content}<|eot_id|>
             <|start_header_id|>assistant<|end_header_id|>\\n\\n
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedModel, PreTrainedTokenizerFast

FAMILIES = ("qwen3", "llama")

# The special tokens of each family, in id order after the regular vocabulary; (text, special).
# Qwen3's <think> and </think> are added tokens that are not "special": decoding keeps them.
SPECIAL_TOKENS: dict[str, tuple[tuple[str, bool], ...]] = {
    "qwen3": (
        ("<|endoftext|>", True),
        ("<|im_start|>", True),
        ("<|im_end|>", True),
        ("<think>", False),
        ("</think>", False),
    ),
    "llama": (
        ("<|begin_of_text|>", True),
        ("<|end_of_text|>", True),
        ("<|start_header_id|>", True),
        ("<|end_header_id|>", True),
        ("<|eot_id|>", True),
    ),
}

# End tokens: a base model and a chat (instruct) model of each family.
BASE_EOS = {"qwen3": "<|endoftext|>", "llama": "<|end_of_text|>"}
CHAT_EOS = {"qwen3": "<|im_end|>", "llama": "<|eot_id|>"}

# Every message is "<|im_start|>{role}\n{content}<|im_end|>\n"; the generation prompt opens the assistant
# turn, and in non-thinking mode (enable_thinking=False) fills it with an empty reasoning block first.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)

# The conversation starts with <|begin_of_text|>; every message is a header with its role, a blank line,
# the trimmed content and <|eot_id|>; the generation prompt is the assistant's header.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}"
    "{{- message['content'] | trim -}}"
    "{{- '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{%- endif -%}"
)

CHAT_TEMPLATES = {"qwen3": QWEN3_CHAT_TEMPLATE, "llama": LLAMA3_CHAT_TEMPLATE}

# Words merged into single tokens (leading "Ġ" is the byte-level space), so that the vocabulary has
# multi-byte tokens as a real BPE vocabulary does.
MERGED_WORDS = ("Ġthe", "Ġanswer", "Ġstep", "boxed", "Ġfinal", "Ġthink", "Ġis", "Ġof")


def byte_symbols() -> list[str]:
    """The byte-level alphabet: one printable character per byte value, in byte order.

    Printable Latin-1 bytes stand for themselves; the remaining bytes (control characters, space, ...)
    are mapped in order onto the characters from U+0100 up, so space becomes "Ġ" and newline "Ċ".
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    symbols = {}
    extra = 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[byte] for byte in range(256)]


def _vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    symbols = byte_symbols()
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    merges: list[tuple[str, str]] = []
    for word in MERGED_WORDS:
        # Left to right: ("Ġ", "t") -> "Ġt", ("Ġt", "h") -> "Ġth", ...
        left = word[0]
        for char in word[1:]:
            merged = left + char
            if merged not in vocab:
                merges.append((left, char))
                vocab[merged] = len(vocab)
            left = merged
    return vocab, merges


def build_family_tokenizer(family: str, *, eos_token: str | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with the special tokens and chat template of a model family.

    Args:
        family: "qwen3" or "llama".
        eos_token: the end token: the base model's (`BASE_EOS`) or the chat model's (`CHAT_EOS`, the
            default). Both tokenizers of a family share every id; only `eos_token` differs, as between
            Qwen3-0.6B-Base and Qwen3-8B.

    Returns:
        A `PreTrainedTokenizerFast` with `chat_template` set. Qwen3: pad `<|endoftext|>`, no BOS. Llama 3:
        BOS `<|begin_of_text|>` (added by `encode` unless `add_special_tokens=False`), no pad token.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    eos_token = CHAT_EOS[family] if eos_token is None else eos_token
    if eos_token not in (BASE_EOS[family], CHAT_EOS[family]):
        raise ValueError(
            f"eos_token for {family} must be {BASE_EOS[family]!r} or {CHAT_EOS[family]!r}, got {eos_token!r}"
        )
    vocab, merges = _vocabulary()
    backend = Tokenizer(models.BPE(vocab, merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_tokens(
        [AddedToken(text, special=special, normalized=False) for text, special in SPECIAL_TOKENS[family]]
    )

    options: dict = {"eos_token": eos_token, "clean_up_tokenization_spaces": False}
    if family == "qwen3":
        options["pad_token"] = "<|endoftext|>"
    else:
        bos = "<|begin_of_text|>"
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, backend.token_to_id(bos))]
        )
        options["bos_token"] = bos
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **options)
    tokenizer.chat_template = CHAT_TEMPLATES[family]
    return tokenizer


def save_tiny_model(
    directory: str | Path,
    family: str,
    *,
    eos_token: str | None = None,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    pad_vocab_to: int = 64,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    edit=None,
) -> Path:
    """Save a randomly initialised tiny model and its family tokenizer into `directory`, as on the hub.

    Args:
        directory: created if missing; receives config.json, model.safetensors, generation_config.json,
            tokenizer.json and tokenizer_config.json.
        family: "qwen3" or "llama".
        eos_token: see `build_family_tokenizer`.
        hidden_size, num_layers, num_heads, num_kv_heads, seed: the architecture and its initialisation.
        pad_vocab_to: the output layer's rows are rounded up to a multiple of this, as real checkpoints pad
            their embeddings beyond the tokenizer (Qwen3: 151936 rows for 151669 tokens).
        dtype: the saved weights' dtype (torch_dtype in config.json).
        edit: optional `(model, tokenizer) -> None` that changes the weights before saving (tests).

    Returns:
        `directory` as a Path.
    """
    from eopd.models import build_causal_lm

    tokenizer = build_family_tokenizer(family, eos_token=eos_token)
    rows = -(-len(tokenizer) // pad_vocab_to) * pad_vocab_to
    model: PreTrainedModel = build_causal_lm(
        family=family,
        vocab_size=rows,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        seed=seed,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if edit is not None:
        with torch.no_grad():
            edit(model, tokenizer)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.to(dtype).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
