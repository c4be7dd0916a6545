"""Tests for eopd.pruning: a student made from its teacher by keeping some of its decoder layers."""

import pytest
import torch

from eopd.models import build_causal_lm
from eopd.pruning import StudentInit, prune_layers

TINY = dict(vocab_size=40, hidden_size=32, num_heads=4, num_kv_heads=2, num_layers=4)


@pytest.fixture(params=[("qwen3", False), ("llama", True)], ids=["qwen3", "llama-tied"])
def teacher(request):
    family, tied = request.param
    return build_causal_lm(family=family, tie_word_embeddings=tied, seed=0, **TINY).eval()


def _layers_by_hand(model, keep, ids):
    """The forward pass through the kept layers only, written against the model's own modules."""
    inner = model.model
    hidden = inner.embed_tokens(ids)
    positions = torch.arange(ids.shape[1])[None]
    rotary = inner.rotary_emb(hidden, positions)
    mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)[None, None]
    for index in keep:
        hidden = inner.layers[index](
            hidden, attention_mask=mask, position_ids=positions, position_embeddings=rotary
        )
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    return model.lm_head(inner.norm(hidden))


def test_keeping_every_layer_gives_the_same_model(teacher):
    ids = torch.randint(0, 40, (2, 7))
    pruned = prune_layers(teacher, range(4))
    assert torch.equal(pruned(ids).logits, teacher(ids).logits)


def test_a_pruned_model_runs_exactly_the_kept_layers(teacher):
    ids = torch.randint(0, 40, (2, 7))
    pruned = prune_layers(teacher, [0, 3])
    assert pruned.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1]
    torch.testing.assert_close(
        pruned(ids).logits, _layers_by_hand(teacher, [0, 3], ids), rtol=1e-5, atol=1e-5
    )


def test_the_pruned_copy_owns_its_weights(teacher):
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    pruned = prune_layers(teacher, [1, 2]).train()
    with torch.no_grad():
        for parameter in pruned.parameters():
            parameter.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    if teacher.config.tie_word_embeddings:  # tied as in the teacher: one matrix for input and output
        assert pruned.lm_head.weight is pruned.model.embed_tokens.weight


def test_a_pruned_model_samples_with_its_kv_cache(teacher):
    """Each kept layer writes its own cache slot: cached decoding equals the full forward."""
    from eopd.rollout import sample
    from eopd.scoring import response_logits

    pruned = prune_layers(teacher, [0, 2, 3])
    batch = sample(
        pruned,
        [[1, 2, 3], [4, 5]],
        max_new_tokens=5,
        eos_token_ids=[0],
        pad_token_id=0,
        generator=torch.Generator().manual_seed(0),
    )
    logits = response_logits(pruned, batch)
    picked = torch.log_softmax(logits.float(), -1).gather(-1, batch.responses[..., None])[..., 0]
    mask = batch.response_mask
    torch.testing.assert_close(picked[mask], batch.sampler_logprobs[mask], rtol=1e-4, atol=1e-4)


def test_save_and_reload_round_trip(teacher, tmp_path):
    from transformers import AutoModelForCausalLM

    pruned = prune_layers(teacher, [1, 3])
    pruned.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 40, (1, 6))
    assert again.config.num_hidden_layers == 2
    assert torch.equal(again(ids).logits, pruned.eval()(ids).logits)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "exactly one of keep_layers and drop_layers"),
        ({"keep_layers": [0], "drop_layers": [1]}, "exactly one of keep_layers and drop_layers"),
        ({"keep_layers": [2, 1]}, "strictly increasing"),
        ({"keep_layers": [1, 1]}, "strictly increasing"),
        ({"drop_layers": [-1]}, "indices >= 0"),
        ({"keep_layers": []}, "keeps no layer"),
    ],
)
def test_bad_layer_choices_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message) as error:
        StudentInit(**fields)
    assert "pair.student.init" in str(error.value)


def test_layer_indices_are_checked_against_the_model():
    assert StudentInit(drop_layers=[1, 2]).kept(4) == (0, 3)
    with pytest.raises(ValueError, match=r"drop_layers=\[3, 4\]: layers \[4\] do not exist, the model has 4"):
        StudentInit(drop_layers=[3, 4]).kept(4)
    with pytest.raises(ValueError, match="removes every layer"):
        StudentInit(drop_layers=[0, 1]).kept(2)


def test_other_architectures_are_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=20))
    with pytest.raises(ValueError, match="depth pruning supports model types .*'gpt2'"):
        prune_layers(gpt2, [0])
