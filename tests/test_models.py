"""Tests for eopd.models: tiny model building, vocabulary checks, end-token remap and response states."""

import pytest
import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from eopd import scoring
from eopd.batch import RolloutBatch
from eopd.models import VocabularyMismatchError, build_causal_lm, check_shared_vocabulary, vocab_size_of
from eopd.scoring import (
    final_hidden_states,
    output_weight,
    position_ids_from_mask,
    remap_end_token,
    response_hidden_states,
    response_logits,
)

TINY = dict(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def model(request):
    return build_causal_lm(family=request.param, seed=0, **TINY).eval()


def make_tokenizer(words: list[str], *, lowercase: bool = False) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `["[UNK]", *words]`, built offline."""
    vocab = {word: index for index, word in enumerate(["[UNK]", *words])}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    if lowercase:
        tokenizer.normalizer = normalizers.Lowercase()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")


WORDS = ["<|endoftext|>", "the", "answer", "is", "x", "=", "2", "boxed"]


# --- build_causal_lm -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_build_is_deterministic_per_seed(family):
    first = build_causal_lm(family=family, seed=3, **TINY).state_dict()
    again = build_causal_lm(family=family, seed=3, **TINY).state_dict()
    other = build_causal_lm(family=family, seed=4, **TINY).state_dict()
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not all(torch.equal(first[name], other[name]) for name in first)


def test_build_leaves_the_global_random_stream_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_causal_lm(seed=0, **TINY)
    assert torch.equal(torch.rand(3), expected)


def test_build_uses_the_requested_architecture():
    model = build_causal_lm(family="llama", intermediate_size=48, eos_token_id=7, pad_token_id=0, **TINY)
    config = model.config
    assert config.model_type == "llama"
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (50, 32, 2)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 8)
    assert config.intermediate_size == 48
    assert (config.eos_token_id, config.pad_token_id) == (7, 0)
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 50)


def test_build_ties_word_embeddings_on_request():
    tied = build_causal_lm(tie_word_embeddings=True, **TINY)
    untied = build_causal_lm(tie_word_embeddings=False, **TINY)
    assert tied.get_output_embeddings().weight is tied.get_input_embeddings().weight
    assert untied.get_output_embeddings().weight is not untied.get_input_embeddings().weight


@pytest.mark.parametrize(
    ("overrides", "argument"),
    [
        ({"family": "gpt2"}, "family"),
        ({"hidden_size": 30}, "hidden_size"),
        ({"num_kv_heads": 3}, "num_kv_heads"),
        ({"num_layers": 0}, "num_layers"),
        ({"eos_token_id": 50}, "eos_token_id"),
    ],
)
def test_build_rejects_bad_arguments_by_name(overrides, argument):
    with pytest.raises(ValueError, match=argument):
        build_causal_lm(**{**TINY, **overrides})


# --- vocabulary -----------------------------------------------------------------------------------------


def test_vocab_size_of_prefers_the_tokenizer_over_padded_embeddings():
    tokenizer = make_tokenizer(WORDS)  # 9 tokens
    padded = build_causal_lm(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4)
    assert vocab_size_of(padded, tokenizer) == 9
    assert vocab_size_of(padded) == 64


def test_shared_vocabulary_returns_its_size():
    assert check_shared_vocabulary(make_tokenizer(WORDS), make_tokenizer(WORDS)) == len(WORDS) + 1


def test_vocabulary_of_another_size_is_rejected():
    with pytest.raises(VocabularyMismatchError, match="9 tokens.*10"):
        check_shared_vocabulary(make_tokenizer(WORDS), make_tokenizer([*WORDS, "<|im_end|>"]))


def test_swapped_token_is_named_by_id_and_pieces():
    teacher_words = list(WORDS)
    teacher_words[1], teacher_words[2] = teacher_words[2], teacher_words[1]  # "the" <-> "answer"
    # Probes without those words pass, so only the whole-vocabulary check can catch the swap.
    with pytest.raises(VocabularyMismatchError, match=r"token id 2 differs: student 'the', teacher 'answer'"):
        check_shared_vocabulary(make_tokenizer(WORDS), make_tokenizer(teacher_words), probes=["x = 2"])


def test_differing_special_token_passes_only_when_ignored():
    student = make_tokenizer(WORDS)
    teacher = make_tokenizer(["<|im_end|>", *WORDS[1:]])
    with pytest.raises(VocabularyMismatchError, match="token id 1"):
        check_shared_vocabulary(student, teacher)
    assert check_shared_vocabulary(student, teacher, ignore_ids={1}) == len(WORDS) + 1


def test_probe_that_encodes_differently_is_named():
    # Same vocabulary, but the teacher lowercases first: "The" is unknown to one side only.
    student, teacher = make_tokenizer(WORDS), make_tokenizer(WORDS, lowercase=True)
    with pytest.raises(
        VocabularyMismatchError, match=r"'x = 2 The'.*token 3.*student id 0 '\[UNK\]'.*teacher id 2"
    ):
        check_shared_vocabulary(student, teacher, probes=["the answer", "x = 2 The"])


# --- end-token remap ------------------------------------------------------------------------------------


def test_remap_replaces_only_the_end_token_inside_the_response():
    end, im_end, pad = 9, 8, 9  # pad id equal to the student's end id, as with Qwen base models
    input_ids = torch.tensor(
        [
            [pad, 9, 3, 4, end, pad, pad],  # prompt holds an end token; response ends early
            [5, 6, 7, 9, 4, 3, 2],  # response never ends, holds no end token
        ]
    )
    response_mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    original = input_ids.clone()
    remapped = remap_end_token(input_ids, response_mask, from_id=end, to_id=im_end)
    assert torch.equal(input_ids, original)  # not modified in place
    expected = original.clone()
    expected[0, 4] = im_end
    expected[1, 3] = im_end  # a response token equal to the end id is remapped wherever it is masked in
    assert torch.equal(remapped, expected)


def test_remap_rejects_a_mask_that_does_not_fit():
    with pytest.raises(ValueError, match="does not fit"):
        remap_end_token(
            torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4, dtype=torch.bool), from_id=1, to_id=2
        )


# --- positions and hidden states ------------------------------------------------------------------------


def test_position_ids_skip_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2, 2], [0, 1, 2, 3, 4, 5]]


def test_final_hidden_states_are_what_the_output_layer_multiplies(model):
    input_ids = torch.tensor([[3, 14, 15, 9, 2, 6]])
    with torch.no_grad():
        hidden = final_hidden_states(model, input_ids, torch.ones_like(input_ids))
        logits = model(input_ids).logits
    assert hidden.shape == (1, 6, 32)
    torch.testing.assert_close(hidden @ output_weight(model).T, logits)


def test_left_padding_does_not_change_hidden_states(model):
    # Rotary embeddings are shift-invariant, so this guards the masking of padding; the sampler tests
    # in test_rollout.py are what catch positions that disagree between prefill and decoding.
    sequence = [3, 14, 15, 9, 2, 6]
    padded = torch.tensor([[0, 0, 0, *sequence]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        alone = final_hidden_states(model, torch.tensor([sequence]), torch.ones(1, 6, dtype=torch.long))
        with_padding = final_hidden_states(model, padded, mask)
    torch.testing.assert_close(with_padding[:, 3:], alone, atol=1e-5, rtol=1e-5)


def test_fallback_without_decoder_attribute_matches(model, monkeypatch):
    input_ids = torch.tensor([[0, 4, 8, 15, 16]])
    mask = torch.tensor([[0, 1, 1, 1, 1]])
    with torch.no_grad():
        expected = final_hidden_states(model, input_ids, mask)
        monkeypatch.setattr(scoring, "decoder_of", lambda model: None)
        fallback = final_hidden_states(model, input_ids, mask)
    torch.testing.assert_close(fallback[:, 1:], expected[:, 1:])


def make_batch(prompt: list[int], response: list[int], *, prompt_pad: int, response_pad: int) -> RolloutBatch:
    """A one-row batch with `prompt_pad` columns of left padding and `response_pad` of right padding."""
    ids = [0] * prompt_pad + prompt + response + [0] * response_pad
    attention = [0] * prompt_pad + [1] * (len(prompt) + len(response)) + [0] * response_pad
    response_mask = [True] * len(response) + [False] * response_pad
    return RolloutBatch(
        input_ids=torch.tensor([ids]),
        attention_mask=torch.tensor([attention]),
        response_mask=torch.tensor([response_mask]),
        prompt_length=prompt_pad + len(prompt),
        truncated=torch.tensor([False]),
    )


def test_response_logits_predict_each_response_token(model):
    prompt, response = [5, 6, 7], [8, 9, 10, 11]
    batch = make_batch(prompt, response, prompt_pad=2, response_pad=3)
    with torch.no_grad():
        scored = response_logits(model, batch)  # (1, R, V)
        full = model(torch.tensor([prompt + response])).logits  # (1, P + R, V), no padding
    assert scored.shape == (1, 7, 50)
    # Response token r is predicted from position P - 1 + r of the unpadded sequence.
    torch.testing.assert_close(scored[:, :4], full[:, 2:6], atol=1e-5, rtol=1e-5)


def test_response_hidden_states_score_a_replacement_copy(model):
    batch = make_batch([5, 6, 7], [8, 9, 10, 11], prompt_pad=0, response_pad=0)
    other_ids = batch.input_ids.clone()
    other_ids[0, 5] = 1  # change the response token at r = 2: only positions r >= 3 can see it
    with torch.no_grad():
        own = response_hidden_states(model, batch)
        other = response_hidden_states(model, batch, input_ids=other_ids)
    torch.testing.assert_close(other[:, :3], own[:, :3])
    assert not torch.allclose(other[:, 3], own[:, 3])
    with pytest.raises(ValueError, match="shape"):
        response_hidden_states(model, batch, input_ids=other_ids[:, 1:])
