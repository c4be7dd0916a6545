"""A character-level tokenizer with Qwen-style chat tokens, built offline for the embedded task's tiny models."""

from __future__ import annotations

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

END_OF_TEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
UNKNOWN = "<|unk|>"
SPECIAL_TOKENS = (END_OF_TEXT, IM_START, IM_END, UNKNOWN)

# Newline plus printable ASCII: enough for the embedded task, the chat template and short math prompts.
CHARACTERS = ("\n", *(chr(code) for code in range(32, 127)))

# Qwen's layout without the system-prompt and tool branches: every message is
# "<|im_start|>{role}\n{content}<|im_end|>\n" and the generation prompt opens the assistant turn.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_tokenizer(*, eos_token: str = END_OF_TEXT) -> PreTrainedTokenizerFast:
    """Build the character-level tokenizer: one token per character, four special tokens, a chat template.

    Ids 0..95 are newline and printable ASCII (space to "~"), in that order; ids 96..99 are
    `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, `<|unk|>`. Any other character becomes `<|unk|>`, so
    decoding gives the text back exactly for newline-and-printable-ASCII text and only for it.

    The two end tokens mirror the Qwen3 families: a base-model student stops with `<|endoftext|>` (the
    default here), a chat teacher with `<|im_end|>` (pass `eos_token="<|im_end|>"`). Both tokenizers have
    the same vocabulary and ids; only `eos_token` differs. `<|endoftext|>` is the pad token in both.

    Args:
        eos_token: the token generation stops at; `<|endoftext|>` or `<|im_end|>`.

    Returns:
        A `PreTrainedTokenizerFast` with `chat_template` set, that round-trips through `save_pretrained`
        and `AutoTokenizer.from_pretrained`.

    Raises:
        ValueError: if `eos_token` is not one of the two end tokens.
    """
    if eos_token not in (END_OF_TEXT, IM_END):
        raise ValueError(f"eos_token must be {END_OF_TEXT!r} or {IM_END!r}, got {eos_token!r}")
    vocab = {token: index for index, token in enumerate((*CHARACTERS, *SPECIAL_TOKENS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNKNOWN))
    # Every single character (newline included) is its own pre-token, so WordLevel maps it to one id.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    # Fuse joins tokens with nothing in between: decoding is plain concatenation.
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS]
    )

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=eos_token,
        pad_token=END_OF_TEXT,
        unk_token=UNKNOWN,
        extra_special_tokens=[IM_START, IM_END] if eos_token == END_OF_TEXT else [IM_START, END_OF_TEXT],
        # The default clean-up rewrites " ." and " 's"; exact decoding needs it off.
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
