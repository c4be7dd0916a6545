"""The character-level tokenizer: exact decoding, the chat template, and the save/load round trip offline."""

import random

import pytest
from transformers import AutoTokenizer

from eopd.tasks.multipath import Problem, ideal_token_entropies, reference_solution
from eopd.tasks.tokenizer import END_OF_TEXT, IM_END, IM_START, UNKNOWN, build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


TEXTS = [
    "3+5=8+2=0+7=7+1=8#8",
    "Let's think step by step.\n\n  Two spaces, a tab-free line; then \\boxed{\\frac{1}{2}}.",
    " leading and trailing space ",
    "don't 's . , ! ?",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
def test_decoding_gives_back_the_text_exactly(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # one token per character
    assert tokenizer.decode(ids) == text


def test_a_response_decodes_exactly_without_its_end_token(tokenizer):
    response = reference_solution(Problem(id="p", terms=(3, 5, 2, 7, 1)), random.Random(0))
    ids = tokenizer(response + IM_END, add_special_tokens=False)["input_ids"]
    assert ids[-1] == tokenizer.convert_tokens_to_ids(IM_END)
    assert tokenizer.decode(ids, skip_special_tokens=True) == response
    assert tokenizer.decode(ids) == response + IM_END


def test_task_responses_have_as_many_tokens_as_the_ideal_entropies_count(tokenizer):
    problem = Problem(id="p", terms=(9, 4, 0, 6, 1, 3))
    response = reference_solution(problem, random.Random(1))
    ids = tokenizer(response + IM_END, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(ideal_token_entropies(problem))


def test_special_tokens_are_single_tokens_and_unknown_characters_map_to_unk(tokenizer):
    ids = tokenizer(f"{IM_START}user\n{IM_END}{END_OF_TEXT}é", add_special_tokens=False)["input_ids"]
    assert ids == [
        tokenizer.convert_tokens_to_ids(IM_START),
        *tokenizer("user\n", add_special_tokens=False)["input_ids"],
        tokenizer.convert_tokens_to_ids(IM_END),
        tokenizer.convert_tokens_to_ids(END_OF_TEXT),
        tokenizer.convert_tokens_to_ids(UNKNOWN),
    ]
    assert len(tokenizer) == 100


def test_chat_template_renders_a_qwen_style_generation_prompt(tokenizer):
    messages = [{"role": "user", "content": "add mod 10: 3 5 2"}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == "<|im_start|>user\nadd mod 10: 3 5 2<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    without = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert without == "<|im_start|>user\nadd mod 10: 3 5 2<|im_end|>\n"


def test_student_and_teacher_tokenizers_share_ids_and_differ_only_in_eos():
    student, teacher = build_tokenizer(), build_tokenizer(eos_token=IM_END)
    assert student.get_vocab() == teacher.get_vocab()
    assert student.eos_token == END_OF_TEXT and teacher.eos_token == IM_END
    assert student.pad_token == teacher.pad_token == END_OF_TEXT
    with pytest.raises(ValueError, match="eos_token"):
        build_tokenizer(eos_token="</s>")


@pytest.mark.parametrize("eos_token", [END_OF_TEXT, IM_END])
def test_save_pretrained_round_trips_through_auto_tokenizer_offline(tmp_path, monkeypatch, eos_token):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    original = build_tokenizer(eos_token=eos_token)
    original.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == original.get_vocab()
    assert (loaded.eos_token, loaded.pad_token, loaded.unk_token) == (eos_token, END_OF_TEXT, UNKNOWN)
    assert loaded.chat_template == original.chat_template
    messages = [{"role": "user", "content": "add mod 10: 1 2 3"}]
    assert loaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == (
        original.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    )
    for text in TEXTS:
        ids = loaded(text, add_special_tokens=False)["input_ids"]
        assert ids == original(text, add_special_tokens=False)["input_ids"]
        assert loaded.decode(ids) == text
