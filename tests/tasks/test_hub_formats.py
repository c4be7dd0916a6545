"""Tests for eopd.tasks.hub_formats: tiny models that load like hub checkpoints, with the families' formats."""

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from eopd.tasks.hub_formats import BASE_EOS, CHAT_EOS, SPECIAL_TOKENS, build_family_tokenizer, save_tiny_model

USER = [{"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    return {
        (family, eos): save_tiny_model(root / f"{family}-{index}", family, eos_token=eos)
        for family in ("qwen3", "llama")
        for index, eos in enumerate((BASE_EOS[family], CHAT_EOS[family]))
    }


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_saved_directory_loads_through_the_auto_classes_like_a_hub_model(saved, family):
    directory = saved[(family, CHAT_EOS[family])]

    config = json.loads((directory / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory)

    assert config["model_type"] == family
    assert (directory / "model.safetensors").is_file()
    assert (directory / "tokenizer_config.json").is_file()
    assert tokenizer.eos_token == CHAT_EOS[family]
    assert tokenizer.chat_template is not None
    # Special tokens come after the regular vocabulary, one id each, as in the real tokenizers.
    specials = [text for text, _ in SPECIAL_TOKENS[family]]
    ids = tokenizer.convert_tokens_to_ids(specials)
    assert ids == list(range(len(tokenizer) - len(specials), len(tokenizer)))
    # The output layer is padded beyond the tokenizer, as Qwen3's 151936 rows for 151669 tokens.
    assert model.get_output_embeddings().weight.shape[0] > len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_base_and_chat_tokenizers_differ_only_in_the_end_token(saved, family):
    base = AutoTokenizer.from_pretrained(saved[(family, BASE_EOS[family])])
    chat = AutoTokenizer.from_pretrained(saved[(family, CHAT_EOS[family])])

    assert base.get_vocab() == chat.get_vocab()
    assert (base.eos_token, chat.eos_token) == (BASE_EOS[family], CHAT_EOS[family])


def test_qwen3_template_renders_the_non_thinking_generation_prompt(saved):
    tokenizer = AutoTokenizer.from_pretrained(saved[("qwen3", CHAT_EOS["qwen3"])])
    opening = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"

    non_thinking = tokenizer.apply_chat_template(
        USER, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    thinking = tokenizer.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    with_system = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, *USER], tokenize=False, add_generation_prompt=True
    )

    assert non_thinking == opening + "<think>\n\n</think>\n\n"
    assert thinking == opening
    assert with_system == "<|im_start|>system\nBe brief.<|im_end|>\n" + opening
    # <think> and </think> are single tokens, as in Qwen3's vocabulary.
    tail = tokenizer.encode("<think>\n\n</think>\n\n", add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(tail)[0] == "<think>"
    assert "</think>" in tokenizer.convert_ids_to_tokens(tail)


def test_llama3_template_renders_headers_and_eot(saved):
    tokenizer = AutoTokenizer.from_pretrained(saved[("llama", CHAT_EOS["llama"])])

    rendered = tokenizer.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    closed = tokenizer.apply_chat_template([*USER, {"role": "assistant", "content": "4"}], tokenize=False)

    assert rendered == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert closed.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>")
    # encode() adds <|begin_of_text|> the way Llama 3 tokenizers do; add_special_tokens=False does not.
    assert tokenizer.encode("x")[0] == tokenizer.bos_token_id
    assert tokenizer.encode("x", add_special_tokens=False) == tokenizer.encode("x")[1:]


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_any_text_round_trips(family):
    tokenizer = build_family_tokenizer(family)
    text = "Ünïcödé: naïve café, 数学 🙂\n\n  \\boxed{\\frac{1}{2}} the answer\t"

    ids = tokenizer.encode(text, add_special_tokens=False)

    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode()), "no merged tokens: the vocabulary is bytes only"


def test_unknown_family_or_end_token_is_rejected():
    with pytest.raises(ValueError, match="family"):
        build_family_tokenizer("gpt2")
    with pytest.raises(ValueError, match="<\\|eot_id\\|>"):
        build_family_tokenizer("qwen3", eos_token="<|eot_id|>")
