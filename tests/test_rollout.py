"""Tests for eopd.rollout: the batch layout, end/pad handling, top-p, and KV-cached sampling vs scoring."""

import functools
import math

import pytest
import torch

from eopd.batch import RolloutBatch, pad_prompts
from eopd.decode_step import direct_decode_step, fused_layer
from eopd.models import build_causal_lm
from eopd.rollout import _draw, _forward_keywords, sample
from eopd.scoring import final_hidden_states, output_weight, position_ids_from_mask, response_logits

PAD = 0
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]  # different lengths: left padding is exercised


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def model(request):
    """A tiny random model with a sharpened output layer, so greedy decoding is far from ties."""
    model = build_causal_lm(
        family=request.param, vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, seed=0
    )
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20)  # logit std of a few nats instead of ~0.1
    return model.eval()


def greedy(model, prompts, **kwargs):
    kwargs.setdefault("pad_token_id", PAD)
    return sample(model, prompts, temperature=0.0, **kwargs)


def greedy_by_recomputing(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding the slow way: the full sequence through the model at every step, no cache."""
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            ids = torch.tensor([sequence])
            hidden = final_hidden_states(model, ids, torch.ones_like(ids))[0, -1]
            sequence.append(int((output_weight(model) @ hidden).argmax()))
    return sequence[len(prompt) :]


def test_pad_prompts_left_pads():
    input_ids, attention_mask = pad_prompts([[1, 2], [3, 4, 5]], pad_token_id=9)
    assert input_ids.tolist() == [[9, 1, 2], [3, 4, 5]]
    assert attention_mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        pad_prompts([[1], []], pad_token_id=9)


def test_kv_cached_greedy_equals_recomputing_each_step(model):
    # No end token in reach (id 49 is never chosen within 8 steps here), so every row runs to the limit.
    batch = greedy(model, PROMPTS, max_new_tokens=8, eos_token_ids=49)
    for row, prompt in enumerate(PROMPTS):
        expected = greedy_by_recomputing(model, prompt, 8)
        assert 49 not in expected
        assert batch.responses[row].tolist() == expected


def test_left_padded_batch_decodes_like_each_prompt_alone(model):
    batch = greedy(model, PROMPTS, max_new_tokens=8, eos_token_ids=49)
    for row, prompt in enumerate(PROMPTS):
        alone = greedy(model, [prompt], max_new_tokens=8, eos_token_ids=49)
        assert batch.responses[row].tolist() == alone.responses[0].tolist()


def test_end_token_mid_response_is_kept_and_what_follows_is_padding(model):
    free = greedy(model, [PROMPTS[1]], max_new_tokens=8, eos_token_ids=49).responses[0].tolist()
    end = free[3]
    at = free.index(end)  # the first time the chosen end token appears
    batch = greedy(model, [PROMPTS[1], PROMPTS[0]], max_new_tokens=8, eos_token_ids=[49, end])
    ended, other = batch.select([0]), batch.select([1])
    assert ended.responses[0, : at + 1].tolist() == free[: at + 1]
    assert ended.response_mask[0].tolist() == [True] * (at + 1) + [False] * (batch.response_length - at - 1)
    assert set(ended.responses[0, at + 1 :].tolist()) <= {PAD}
    assert not bool(ended.truncated[0])
    assert int(ended.response_lengths[0]) == at + 1
    # The other row is unaffected by its neighbour ending.
    assert (
        other.responses[0].tolist()[: other.response_lengths[0]]
        == greedy(model, [PROMPTS[0]], max_new_tokens=8, eos_token_ids=[49, end])
        .responses[0]
        .tolist()[: other.response_lengths[0]]
    )
    # Scoring sees exactly the tokens the mask covers.
    assert torch.equal(batch.attention_mask[:, batch.prompt_length :], batch.response_mask.long())


def test_pad_equal_to_end_token_still_masks_the_real_end(model):
    free = greedy(model, [PROMPTS[1]], max_new_tokens=8, eos_token_ids=49).responses[0].tolist()
    end = free[2]
    at = free.index(end)
    # Row 0 ends at `at`; row 1 (a prompt whose greedy path differs) keeps going, so row 0 gets padding.
    batch = greedy(model, [PROMPTS[1], PROMPTS[2]], max_new_tokens=8, eos_token_ids=end, pad_token_id=end)
    lengths = batch.response_lengths.tolist()
    assert lengths[0] == at + 1
    assert lengths[1] > lengths[0], "test needs row 1 to run longer than row 0"
    mask = batch.response_mask[0].tolist()
    assert mask == [True] * (at + 1) + [False] * (batch.response_length - at - 1)
    assert batch.responses[0, at].item() == end  # the real end token, masked in
    assert batch.responses[0, at + 1 :].eq(end).all()  # padding with the same id, masked out
    assert batch.num_valid_tokens == sum(lengths)


def test_no_end_token_before_the_limit_is_truncated(model):
    batch = greedy(model, PROMPTS, max_new_tokens=5, eos_token_ids=49)
    assert batch.response_length == 5
    assert batch.truncated.all()
    assert batch.response_mask.all()
    assert batch.num_valid_tokens == 15


def test_sampling_stops_once_every_row_has_ended(model):
    first_tokens = greedy(model, PROMPTS, max_new_tokens=1, eos_token_ids=49).responses[:, 0].tolist()
    batch = greedy(model, PROMPTS, max_new_tokens=20, eos_token_ids=first_tokens)
    assert batch.response_length == 1
    assert not batch.truncated.any()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_match_scoring_at_the_same_temperature(model, temperature):
    generator = torch.Generator().manual_seed(0)
    batch = sample(
        model, PROMPTS, max_new_tokens=12, eos_token_ids=[3, 4], pad_token_id=PAD, temperature=temperature,
        generator=generator,
    )  # fmt: skip
    assert batch.response_mask.sum(-1).min() >= 1
    with torch.no_grad():
        logprobs = torch.log_softmax(response_logits(model, batch).float() / temperature, dim=-1)
    scored = logprobs.gather(-1, batch.responses[..., None]).squeeze(-1) * batch.response_mask
    torch.testing.assert_close(batch.sampler_logprobs, scored, atol=1e-5, rtol=1e-5)
    assert batch.sampler_logprobs[~batch.response_mask].eq(0).all()


def test_repeated_prompts_share_one_prefill_and_sample_as_the_model_scores(model, monkeypatch):
    """n samples of a prompt (adjacent rows) are prefilled once; each row still samples its own tokens."""
    prompts = [p for p in PROMPTS for _ in range(3)]  # 3 samples of each prompt
    prefilled = []
    forward = type(model).forward

    @functools.wraps(forward)  # the sampler reads the forward's signature
    def counting(self, input_ids=None, **kwargs):
        if input_ids is not None and input_ids.shape[1] > 1:
            prefilled.append(input_ids.shape[0])
        return forward(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(type(model), "forward", counting)
    batch = sample(
        model, prompts, max_new_tokens=10, eos_token_ids=[3, 4], pad_token_id=PAD,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    monkeypatch.undo()

    assert prefilled == [len(PROMPTS)]
    assert len({tuple(r) for r in batch.responses[:3].tolist()}) > 1, "samples of one prompt differ"
    with torch.no_grad():
        logprobs = torch.log_softmax(response_logits(model, batch).float(), dim=-1)
    scored = logprobs.gather(-1, batch.responses[..., None]).squeeze(-1) * batch.response_mask
    torch.testing.assert_close(batch.sampler_logprobs, scored, atol=1e-5, rtol=1e-5)


def test_scoring_repeated_prompts_once_gives_the_full_scoring(model):
    from eopd.scoring import response_hidden_states, response_hidden_states_shared_prompts

    prompts = [p for p in PROMPTS for _ in range(4)]
    batch = sample(
        model, prompts, max_new_tokens=9, eos_token_ids=[3, 4], pad_token_id=PAD,
        generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    with torch.no_grad():
        full = response_hidden_states(model, batch)
        shared = response_hidden_states_shared_prompts(model, batch)
    mask = batch.response_mask
    torch.testing.assert_close(shared[mask], full[mask], atol=1e-5, rtol=1e-5)


def test_seeded_generator_reproduces_the_rollout(model):
    def draw(seed):
        return sample(
            model, PROMPTS, max_new_tokens=10, eos_token_ids=3, pad_token_id=PAD,
            generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip

    first, again, other = draw(1), draw(1), draw(2)
    assert torch.equal(first.input_ids, again.input_ids)
    assert torch.equal(first.sampler_logprobs, again.sampler_logprobs)
    assert not torch.equal(first.input_ids, other.input_ids)


def with_trained_norms(model):
    """Every RMSNorm weight drawn around 1 (they start at exactly 1): the q and k norms differ."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.copy_(1 + 0.3 * torch.randn(module.weight.shape, generator=g))
    return model


@pytest.mark.parametrize("family", ["qwen3", "llama"])
@pytest.mark.parametrize("kv_heads", [4, 2])  # grouped-query attention packs the query in SDPA
def test_the_direct_decode_step_samples_bitwise_like_the_model_forward(monkeypatch, kv_heads, family):
    # The sampler runs each new token through a fused body of the decoder's layers (stacked q/k/v and
    # gate/up products, torch.rms_norm in float32, q and k normed and rotated together) instead of
    # `model(...)`; tokens and log-probs must be exactly those of `model(...)`: left padding, rows
    # ending early, several seeds.
    model = with_trained_norms(
        build_causal_lm(
            family=family, vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=kv_heads
        )
    )
    assert direct_decode_step(model, "cache") is not None
    assert all(fused_layer(layer, model.config) is not None for layer in model.model.layers)

    def draw(prompts, seed):
        return sample(
            model, prompts, max_new_tokens=12, eos_token_ids=[3, 7], pad_token_id=PAD,
            generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip

    for prompts in (PROMPTS, [[5, 6, 7], [8, 9, 10]]):  # padded, then not padded
        direct = [draw(prompts, seed) for seed in range(3)]
        monkeypatch.setattr("eopd.rollout.direct_decode_step", lambda *args: None)
        through_forward = [draw(prompts, seed) for seed in range(3)]
        monkeypatch.undo()
        for a, b in zip(direct, through_forward, strict=True):
            assert torch.equal(a.input_ids, b.input_ids)
            assert torch.equal(a.sampler_logprobs, b.sampler_logprobs)
    ended_early = [int(b.response_mask[i].sum()) for b in direct for i in range(b.batch_size)]
    assert min(ended_early) < 12  # some row stopped before the limit: its padding was masked


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_the_fused_layer_step_equals_the_layer_modules(dtype):
    """One decoding step's logits, bitwise, against the same step through the layers' own modules."""
    import eopd.decode_step
    import eopd.rollout

    model = with_trained_norms(
        build_causal_lm(vocab_size=50, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    ).to(dtype)
    input_ids, attention_mask = pad_prompts(PROMPTS, PAD)
    logits = {}
    for fused in (True, False):
        with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
            if not fused:
                patch.setattr(eopd.decode_step, "fused_layer", lambda layer, config: None)
            step = direct_decode_step(model, "cache")
            cache = eopd.rollout._new_cache(model, 16)
            model(input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=True,
                  position_ids=position_ids_from_mask(attention_mask))  # fmt: skip
            mask = torch.cat([attention_mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
            position_ids = (mask.sum(dim=1) - 1)[:, None]
            logits[fused] = step(torch.tensor([4, 5, 6]), mask, position_ids, cache)
    assert torch.equal(logits[True], logits[False])


@pytest.mark.parametrize("where", ["o_proj", "q_proj", "gate_proj", "input_layernorm", "mlp", "layer", "all"])
def test_hooked_models_run_every_hook_at_every_decoding_step(where):
    # The decoding step calls many modules as functions of their weights (stacked q/k/v, the norms, the
    # layers' bodies); a hook someone registers (a probe, steering, an adapter) anywhere in the model,
    # or on all modules, must still run at every step and see what the model's forward gives it.
    model = build_causal_lm(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4)
    layer = model.model.layers[1]
    modules = {
        "o_proj": layer.self_attn.o_proj,
        "q_proj": layer.self_attn.q_proj,
        "gate_proj": layer.mlp.gate_proj,
        "input_layernorm": layer.input_layernorm,
        "mlp": layer.mlp,
        "layer": layer,
    }
    calls = []

    def count(module, args, output):
        if where == "all" and module is not layer:
            return None
        calls.append(output.clone())
        return output * 1.5 if where == "mlp" else None  # a hook that changes the output, too

    if where == "all":
        handle = torch.nn.modules.module.register_module_forward_hook(count)
    else:
        handle = modules[where].register_forward_hook(count)
    try:
        assert direct_decode_step(model, "cache") is None
        batch = sample(model, PROMPTS, max_new_tokens=4, eos_token_ids=49, pad_token_id=PAD,
                       generator=torch.Generator().manual_seed(0))  # fmt: skip
        with torch.no_grad():
            scored = response_logits(model, batch).log_softmax(-1)  # the hooks run here too
    finally:
        handle.remove()
    assert direct_decode_step(model, "cache") is not None  # unhooked: the fast step again
    steps = batch.responses.shape[1]  # the prefill (the model's forward) and steps - 1 decoding steps
    assert len(calls) == steps + 1  # and the scoring forward
    sampled = scored.gather(-1, batch.responses[..., None]).squeeze(-1)
    mask = batch.response_mask
    torch.testing.assert_close(sampled[mask], batch.sampler_logprobs[mask], rtol=0, atol=2e-5)


def test_subclasses_of_linear_decode_through_their_own_forward(monkeypatch):
    # A Linear subclass (a quantised or otherwise wrapped projection) may compute something other than
    # x @ weight.T from its weight: the step must call it, not stack or reuse its raw weight.
    class Doubled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = build_causal_lm(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, seed=0)
    with torch.no_grad():
        for layer in model.model.layers:
            parents = {"k_proj": layer.self_attn, "up_proj": layer.mlp, "down_proj": layer.mlp}
            for name, parent in parents.items():
                old = getattr(parent, name)
                new = Doubled(old.in_features, old.out_features, bias=False)
                new.weight.copy_(old.weight)
                setattr(parent, name, new)
    assert direct_decode_step(model, "cache") is not None  # the fast step still runs, around them

    def draw():
        return sample(model, PROMPTS, max_new_tokens=6, eos_token_ids=49, pad_token_id=PAD,
                      generator=torch.Generator().manual_seed(1))  # fmt: skip

    direct = draw()
    monkeypatch.setattr("eopd.rollout.direct_decode_step", lambda *args: None)
    through_forward = draw()
    assert torch.equal(direct.input_ids, through_forward.input_ids)
    assert torch.equal(direct.sampler_logprobs, through_forward.sampler_logprobs)


def test_layers_with_biases_or_another_activation_decode_through_their_modules():
    for overrides in ({"attention_bias": True}, {"mlp_bias": True}, {"hidden_act": "gelu"}):
        model = build_causal_lm(family="llama", vocab_size=50, hidden_size=32, num_layers=1, num_heads=4)
        for key, value in overrides.items():
            setattr(model.config, key, value)
        assert fused_layer(model.model.layers[0], model.config) is None, overrides
        assert direct_decode_step(model, "cache") is not None  # the module path still runs


@pytest.mark.parametrize("capacity", [None, 4])  # None: room for the whole rollout; 4: it must grow
def test_the_reserved_kv_cache_samples_bitwise_like_the_concatenating_cache(monkeypatch, capacity):
    # The cache writes each new key and value into reserved storage instead of concatenating them onto
    # the whole cache (O(R^2) copies); attention must see the same tensors: the same tokens and log-probs.
    from transformers import DynamicCache

    import eopd.rollout

    model = build_causal_lm(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)
    reserved_cache = eopd.rollout._new_cache
    caches = []

    def reserved(model, size):
        caches.append(reserved_cache(model, size if capacity is None else capacity))
        return caches[-1]

    def draw(prompts, seed):
        return sample(
            model, prompts, max_new_tokens=12, eos_token_ids=[3, 7], pad_token_id=PAD,
            generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip

    for prompts in (PROMPTS, [[5, 6, 7], [8, 9, 10]]):
        monkeypatch.setattr("eopd.rollout._new_cache", reserved)
        with_reserved = [draw(prompts, seed) for seed in range(3)]
        monkeypatch.setattr("eopd.rollout._new_cache", lambda model, size: DynamicCache(config=model.config))
        concatenating = [draw(prompts, seed) for seed in range(3)]
        monkeypatch.undo()
        for a, b in zip(with_reserved, concatenating, strict=True):
            assert torch.equal(a.input_ids, b.input_ids)
            assert torch.equal(a.sampler_logprobs, b.sampler_logprobs)
    layer = caches[-1].layers[0]
    assert type(layer).__name__ == "ReservedLayer"
    assert layer.keys.data_ptr() == layer.storage[0].data_ptr()  # a view of the storage, not a copy
    assert layer.storage[0].shape[-2] >= layer.get_seq_length() > (capacity or 0)


def test_ended_rows_leave_the_decoding_batch_and_the_rest_sample_as_before(monkeypatch, model):
    # Rows that have ended stop being computed (their cache rows go too); every row is still drawn from
    # at every step, so the random stream and therefore the draws of the other rows stay the same. The
    # per-row arithmetic may differ in the last bits at another batch size (CPU attention splits its work
    # by batch size), hence close log-probs rather than equal ones.
    import eopd.rollout

    prompts = [[5 + i, 6, 7 + i % 3][: 1 + i % 3] for i in range(12)]
    kept: list[int] = []
    select = eopd.rollout._new_cache(model, 8).__class__.batch_select_indices

    def spy(cache, indices):
        kept.append(len(indices))
        return select(cache, indices)

    def draw(seed):
        return sample(
            model, prompts, max_new_tokens=16, eos_token_ids=[3, 7, 11], pad_token_id=PAD,
            generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip

    monkeypatch.setattr(type(eopd.rollout._new_cache(model, 8)), "batch_select_indices", spy)
    dropping = [draw(seed) for seed in range(4)]
    assert kept and min(kept) < len(prompts)  # rows did leave the batch
    monkeypatch.setattr("eopd.rollout._should_drop", lambda ended, batch_size, decoding: False)
    kept.clear()
    keeping = [draw(seed) for seed in range(4)]
    assert not kept
    lengths = [int(b.response_mask[i].sum()) for b in keeping for i in range(b.batch_size)]
    assert min(lengths) < 8 and max(lengths) > 8  # rows ended at different steps
    for a, b in zip(dropping, keeping, strict=True):
        assert torch.equal(a.input_ids, b.input_ids)
        assert torch.equal(a.attention_mask, b.attention_mask)
        assert torch.equal(a.truncated, b.truncated)
        torch.testing.assert_close(a.sampler_logprobs, b.sampler_logprobs, rtol=1e-5, atol=1e-5)


def test_a_lora_student_gets_the_kv_cache_under_its_current_name():
    # peft's wrapper forwards **kwargs; asked about its own signature, the sampler would fall back to
    # `past_key_values`, which transformers deprecates (removed in 5.40).
    peft = pytest.importorskip("peft")
    model = build_causal_lm(vocab_size=50, hidden_size=32, num_layers=1, num_heads=4, seed=0)
    plain = sample(model, [[1, 2, 3]], max_new_tokens=4, eos_token_ids=[0], pad_token_id=0, temperature=0)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    assert _forward_keywords(lora) == ("cache", True)
    greedy = sample(lora, [[1, 2, 3]], max_new_tokens=4, eos_token_ids=[0], pad_token_id=0, temperature=0)
    assert torch.equal(greedy.input_ids, plain.input_ids)  # LoRA's B starts at zero: the same model


def test_tiny_top_p_decodes_greedily(model):
    greedy_batch = greedy(model, PROMPTS, max_new_tokens=6, eos_token_ids=49)
    nucleus_of_one = sample(
        model, PROMPTS, max_new_tokens=6, eos_token_ids=49, pad_token_id=PAD, top_p=1e-6,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert torch.equal(nucleus_of_one.input_ids, greedy_batch.input_ids)
    assert nucleus_of_one.sampler_logprobs.eq(0).all()  # the kept token has all the mass


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().expand(20_000, 4)
    generator = torch.Generator().manual_seed(0)
    # Mass 0.5 alone is short of 0.7; with 0.3 it reaches 0.8: tokens 1 and 3, renormalised.
    tokens, logprobs = _draw(logits, temperature=1.0, top_p=0.7, generator=generator)
    assert set(tokens.tolist()) == {1, 3}
    assert abs(tokens.eq(1).float().mean().item() - 0.625) < 0.02
    expected = torch.where(tokens == 1, math.log(0.5 / 0.8), math.log(0.3 / 0.8))
    torch.testing.assert_close(logprobs, expected)
    # A top token that reaches the mass alone is the whole nucleus.
    tokens, logprobs = _draw(logits[:100], temperature=1.0, top_p=0.45, generator=generator)
    assert tokens.eq(1).all() and logprobs.abs().max() < 1e-6


def test_sampling_restores_the_training_mode_and_builds_no_graph(model):
    model.train()
    try:
        batch = sample(model, PROMPTS, max_new_tokens=3, eos_token_ids=49, pad_token_id=PAD)
        assert model.training
        assert not batch.sampler_logprobs.requires_grad
    finally:
        model.eval()
    sample(model, PROMPTS, max_new_tokens=3, eos_token_ids=49, pad_token_id=PAD)
    assert not model.training


def test_the_sampled_batch_can_be_saved_for_backward_and_written_in_place(model):
    # The loop runs under inference mode; what it returns must be ordinary tensors, or the update's
    # forward (an embedding saves its ids for backward) and in-place edits of the batch would fail.
    batch = sample(model, PROMPTS, max_new_tokens=4, eos_token_ids=49, pad_token_id=PAD)
    fields = [batch.input_ids, batch.attention_mask, batch.response_mask, batch.truncated]
    assert not any(t.is_inference() for t in [*fields, batch.sampler_logprobs])
    weight = torch.ones(1, requires_grad=True)
    logits = model.get_input_embeddings()(batch.input_ids).sum(-1)[:, -batch.response_mask.shape[1] :]
    (logits * batch.response_mask * batch.sampler_logprobs * weight).sum().backward()
    assert weight.grad is not None
    batch.sampler_logprobs.mul_(1.0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_new_tokens": 0}, r"max_new_tokens must be an integer >= 1, got 0"),
        ({"temperature": -0.5}, r"temperature must be a finite number >= 0 .*got -0.5"),
        ({"top_p": 0.0}, r"top_p must lie in \(0, 1\] .*got 0.0"),
        ({"top_p": 1.5}, r"top_p must lie in \(0, 1\] .*got 1.5"),
        ({"eos_token_ids": []}, r"eos_token_ids must name at least one"),
        ({"pad_token_id": 50}, r"pad_token_id must lie in \[0, 50\)"),
        ({"prompts": [[1, 2], [60]]}, r"prompts\[1\] holds ids outside \[0, 50\)"),
    ],
)
def test_bad_sampling_arguments_are_named(model, overrides, message):
    arguments = dict(prompts=PROMPTS, max_new_tokens=4, eos_token_ids=3, pad_token_id=PAD)
    arguments.update(overrides)
    prompts = arguments.pop("prompts")
    with pytest.raises(ValueError, match=message):
        sample(model, prompts, **arguments)


# --- RolloutBatch ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_rollouts(model):
    """Two sampled batches of different prompt and response widths, with their response logits."""
    short = sample(model, [[5, 6], [7]], max_new_tokens=4, eos_token_ids=3, pad_token_id=PAD, temperature=0.0)
    long = sample(
        model, [[8, 9, 10, 11, 12]], max_new_tokens=9, eos_token_ids=49, pad_token_id=PAD, temperature=0.0
    )
    assert (short.prompt_length, short.response_length) != (long.prompt_length, long.response_length)
    return short, long


def test_select_returns_the_rows_asked_for(two_rollouts):
    short, _ = two_rollouts
    picked = short.select(torch.tensor([1]))
    assert picked.batch_size == 1
    assert torch.equal(picked.input_ids, short.input_ids[1:])
    assert torch.equal(picked.sampler_logprobs, short.sampler_logprobs[1:])
    assert torch.equal(short.select(slice(0, 1)).response_mask, short.response_mask[:1])
    assert torch.equal(short.select([1, 0]).input_ids, short.input_ids.flip(0))
    by_mask = short.select(torch.tensor([False, True]))  # a row mask, not the indices 0 and 1
    assert torch.equal(by_mask.input_ids, picked.input_ids)


def test_concat_repads_and_scores_like_the_parts(model, two_rollouts):
    short, long = two_rollouts
    both = RolloutBatch.concat([short, long], pad_token_id=PAD)
    assert both.prompt_length == max(short.prompt_length, long.prompt_length)
    assert both.response_length == max(short.response_length, long.response_length)
    assert both.num_valid_tokens == short.num_valid_tokens + long.num_valid_tokens
    assert torch.equal(both.truncated, torch.cat([short.truncated, long.truncated]))
    with torch.no_grad():
        parts = [response_logits(model, short), response_logits(model, long)]
        joined = response_logits(model, both)
    for rows, part, batch in [(slice(0, 2), parts[0], short), (slice(2, 3), parts[1], long)]:
        width = batch.response_length
        assert torch.equal(both.responses[rows, :width], batch.responses)
        assert torch.equal(both.response_mask[rows, :width], batch.response_mask)
        mask = batch.response_mask
        torch.testing.assert_close(joined[rows, :width][mask], part[mask], atol=1e-5, rtol=1e-5)


def test_batch_rejects_inconsistent_shapes():
    with pytest.raises(ValueError, match="response_mask must have shape"):
        RolloutBatch(
            input_ids=torch.zeros(2, 5, dtype=torch.long),
            attention_mask=torch.ones(2, 5, dtype=torch.long),
            response_mask=torch.ones(2, 3, dtype=torch.bool),
            prompt_length=3,
            truncated=torch.zeros(2, dtype=torch.bool),
        )


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
        ),
    ],
)
def test_rollout_on_a_device_is_reproducible_and_scored_consistently(device):
    model = (
        build_causal_lm(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, seed=0).to(device).eval()
    )

    def draw():
        return sample(
            model, PROMPTS, max_new_tokens=10, eos_token_ids=3, pad_token_id=PAD, temperature=0.8, top_p=0.9,
            generator=torch.Generator(device=device).manual_seed(0),
        )  # fmt: skip

    batch, again = draw(), draw()
    assert batch.input_ids.device.type == device
    assert torch.equal(batch.input_ids, again.input_ids)
    assert torch.equal(batch.to("cpu").input_ids, batch.input_ids.cpu())
    # With top_p < 1 the sampler's log-prob is at least the full distribution's (mass renormalised up).
    with torch.no_grad():
        full = torch.log_softmax(response_logits(model, batch).float() / 0.8, dim=-1)
    scored = full.gather(-1, batch.responses[..., None]).squeeze(-1)
    mask = batch.response_mask
    assert (batch.sampler_logprobs[mask] >= scored[mask] - 1e-4).all()


@pytest.mark.parametrize("seed", [0, 7, 2**40, 2**62])
def test_every_run_seed_gives_a_generator_seed_and_small_seeds_keep_their_streams(seed):
    from types import SimpleNamespace

    from eopd.sampling import Sampling

    module = SimpleNamespace(seed=seed, rollout_step=3, _distributed=False)

    value = Sampling._stream(module, 2)

    torch.Generator().manual_seed(value)  # raises for a seed outside [-2**63, 2**64)
    if seed < 10**9:  # the streams runs have always drawn from
        assert value == ((seed * 1_000_003 + 3 * 101 + 2) * 7919)


@pytest.mark.parametrize("shape", [(1, 7), (8, 102), (5, 3000)])
def test_the_draw_takes_the_tokens_torch_multinomial_takes_from_the_same_stream(shape):
    """Same generator state, same tokens: runs seeded before and after the draw changed sample alike."""
    logits = 3 * torch.randn(shape, generator=torch.Generator().manual_seed(shape[1]))
    logprobs = torch.log_softmax(logits / 0.7, dim=-1)
    for seed in range(20):
        generator = torch.Generator().manual_seed(seed)
        tokens, drawn = _draw(logits, temperature=0.7, top_p=1.0, generator=generator)
        reference = torch.Generator().manual_seed(seed)
        expected = torch.multinomial(logprobs.exp(), 1, generator=reference).squeeze(-1)
        assert torch.equal(tokens, expected)
        assert torch.equal(drawn, logprobs.gather(-1, tokens[:, None]).squeeze(-1))
        assert torch.equal(generator.get_state(), reference.get_state())  # the stream moved alike


def test_non_finite_logits_stop_sampling_with_the_rows_named(model):
    # Token 12 appears in the second prompt only; a NaN in its embedding makes that row's logits NaN.
    with torch.no_grad():
        saved = model.get_input_embeddings().weight[12].clone()
        model.get_input_embeddings().weight[12] = float("nan")
    try:
        with pytest.raises(ValueError, match=r"non-finite logits \(NaN or inf\) in rows \[1\]"):
            # One token: a longer response could draw token 12 in another row and name it too.
            sample(model, PROMPTS, max_new_tokens=1, eos_token_ids=49, pad_token_id=PAD)
    finally:
        with torch.no_grad():
            model.get_input_embeddings().weight[12] = saved
