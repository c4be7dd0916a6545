"""The rollout engine contract: on the Hugging Face engine on CPU, and on vLLM where it and a GPU exist."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from eopd.batch import RolloutBatch
from eopd.models import build_causal_lm
from eopd.module import DistillModule
from eopd.objectives import preset
from eopd.rollout_engines import (
    HFEngine,
    RolloutEngine,
    VLLMEngine,
    make_engine,
    rollout_from_responses,
    vllm_available,
)
from eopd.scoring import response_logits
from eopd.specs import OptimSpec, PairSpec, RolloutSpec, UpdateSpec

V, PAD, EOS = 40, 0, 1
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [14], [20, 21]]


def tiny_model(rows=V, seed=0):
    model = build_causal_lm(vocab_size=rows, hidden_size=32, num_layers=2, num_heads=4, seed=seed)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8)  # sharper than uniform: sampled tokens differ in prob
    return model


def recomputed_logprobs(model, batch: RolloutBatch, temperature: float, vocab_size: int) -> torch.Tensor:
    """log pi(y_t) of the drawn tokens, recomputed by a full forward (the trainer's view), (B, R)."""
    with torch.no_grad():
        logits = response_logits(model.eval(), batch)[..., :vocab_size].float()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(-1, batch.responses[..., None]).squeeze(-1)


def check_contract(engine, model, *, vocab_size=V, atol=1e-4, **kwargs):
    """What every engine promises the trainer; returns the batch for engine-specific checks."""
    assert isinstance(engine, RolloutEngine)
    temperature = 0.7
    batch = engine.generate(
        model,
        PROMPTS,
        max_new_tokens=8,
        eos_token_ids=(EOS,),
        pad_token_id=PAD,
        temperature=temperature,
        vocab_size=vocab_size,
        **kwargs,
    )
    assert isinstance(batch, RolloutBatch)
    assert batch.batch_size == len(PROMPTS) and batch.response_length <= 8
    for row, prompt in enumerate(PROMPTS):  # prompts left-padded, in order
        prompt_block = batch.prompts[row][batch.attention_mask[row, : batch.prompt_length].bool()]
        assert prompt_block.tolist() == prompt
    mask = batch.response_mask
    responses = batch.responses
    assert int(responses[mask].max()) < vocab_size  # never a padded output row
    for row in range(batch.batch_size):
        ids = responses[row][mask[row]].tolist()
        ended = EOS in ids
        assert ended != bool(batch.truncated[row])
        if ended:  # the end token is the last valid token, and the response mask stops there
            assert ids.index(EOS) == len(ids) - 1
        else:
            assert len(ids) == 8
    # The recorded log-probs are those of the sampler's distribution: what the on-policy guard compares.
    assert batch.sampler_logprobs is not None
    expected = recomputed_logprobs(model, batch, temperature, vocab_size)
    torch.testing.assert_close(batch.sampler_logprobs[mask], expected[mask], atol=atol, rtol=0)
    assert (batch.sampler_logprobs[~mask] == 0).all()
    return batch


def test_hf_engine_keeps_the_contract():
    model = tiny_model(rows=V + 8)  # padded output rows past the shared vocabulary
    check_contract(HFEngine(), model, generator=torch.Generator().manual_seed(0))


def test_hf_engine_reproduces_a_rollout_from_its_seeded_stream():
    model = tiny_model()
    engine = make_engine("hf")
    kwargs = dict(max_new_tokens=8, eos_token_ids=(EOS,), pad_token_id=PAD)
    first = engine.generate(model, PROMPTS, generator=torch.Generator().manual_seed(3), **kwargs)
    again = engine.generate(model, PROMPTS, generator=torch.Generator().manual_seed(3), **kwargs)
    other = engine.generate(model, PROMPTS, generator=torch.Generator().manual_seed(4), **kwargs)
    assert torch.equal(first.input_ids, again.input_ids)
    assert not torch.equal(first.input_ids, other.input_ids)


def test_rollout_from_responses_lays_out_an_external_engines_output():
    batch = rollout_from_responses(
        [[5, 6], [7]],
        [[9, 10, EOS], [11]],
        [[-0.5, -1.0, -0.1], [-2.0]],
        [False, True],
        pad_token_id=PAD,
    )
    assert batch.input_ids.tolist() == [[5, 6, 9, 10, EOS], [PAD, 7, 11, PAD, PAD]]
    assert batch.response_mask.tolist() == [[True, True, True], [True, False, False]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 0, 0]]
    assert batch.truncated.tolist() == [False, True]
    torch.testing.assert_close(batch.sampler_logprobs, torch.tensor([[-0.5, -1.0, -0.1], [-2.0, 0, 0]]))
    with pytest.raises(ValueError, match="2 response tokens but 1 log-probs"):
        rollout_from_responses([[5]], [[9, EOS]], [[-0.5]], [False], pad_token_id=PAD)


def test_unknown_or_misconfigured_engines_are_reported():
    with pytest.raises(ValueError, match="rollout.engine='sglang' is unknown"):
        make_engine("sglang")
    with pytest.raises(ValueError, match="rollout.engine='sglang' is unknown"):
        RolloutSpec(engine="sglang")
    with pytest.raises(ValueError, match="takes no engine options"):
        make_engine("hf", model_path="x")
    if not vllm_available():
        with pytest.raises(ImportError, match=r"pip install -e '\.\[vllm\]'"):
            VLLMEngine("some/model")
    student, teacher = tiny_model(), tiny_model(seed=1)
    pair = PairSpec(vocab_size=V, pad_token_id=PAD, student_eos_ids=(EOS,))
    with pytest.raises(ValueError, match="needs the engine object"):
        DistillModule(
            student, teacher, preset("eopd", top_k=8), pair=pair, rollout=RolloutSpec(engine="vllm")
        )


def test_top_p_below_one_warns_that_rollouts_are_off_policy():
    student, teacher = tiny_model(), tiny_model(seed=1)
    pair = PairSpec(vocab_size=V, pad_token_id=PAD, student_eos_ids=(EOS,))
    with pytest.warns(UserWarning, match="top_p=0.9 samples from a truncated distribution"):
        DistillModule(student, teacher, preset("eopd", top_k=8), pair=pair, rollout=RolloutSpec(top_p=0.9))


class CountingEngine(HFEngine):
    def __init__(self):
        self.generated, self.synced = 0, []

    def generate(self, model, prompts, **kwargs):
        self.generated += 1
        return super().generate(model, prompts, **kwargs)

    def sync_weights(self, model):
        self.synced.append([p.detach().clone() for p in model.parameters()])


def test_the_trainer_samples_through_its_engine_and_pushes_weights_after_each_rollout_step(tmp_path):
    student, teacher = tiny_model(), tiny_model(seed=1)
    engine = CountingEngine()
    module = DistillModule(
        student,
        teacher,
        preset("eopd", top_k=8),
        pair=PairSpec(vocab_size=V, pad_token_id=PAD, student_eos_ids=(EOS,)),
        rollout=RolloutSpec(max_new_tokens=6),
        update=UpdateSpec(mini_batch_size=4),
        optim=OptimSpec(lr=1e-2, schedule="constant"),
        engine=engine,
    )
    records = [{"prompt_ids": p} for p in PROMPTS] * 2
    loader = torch.utils.data.DataLoader(records, batch_size=4, collate_fn=list)
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, loader)

    assert engine.generated == 2 and len(engine.synced) == 2
    # Pushed after the update: the engine receives the weights the next rollout must sample from.
    for pushed, now in zip(engine.synced[-1], module.student.parameters(), strict=True):
        assert torch.equal(pushed, now.detach())
    assert any(not torch.equal(a, b) for a, b in zip(engine.synced[0], engine.synced[1], strict=True))
    assert "rollout/sampler_kl_k3" in module.last_logs  # the on-policy guard, every step
    assert abs(module.last_logs["rollout/sampler_kl_k3"]) < 1e-4  # HF samples from the trained model


# ---- vLLM (optional extra, GPU) ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_engine_and_model(tmp_path_factory):
    if not vllm_available():
        pytest.skip("vLLM is not installed (pip install -e '.[vllm]')")
    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a CUDA device")
    path = tmp_path_factory.mktemp("student")
    model = tiny_model(rows=V + 8)  # vLLM must not sample the padded rows either
    model.save_pretrained(path)
    engine = VLLMEngine(str(path), dtype="float32", gpu_memory_utilization=0.2, enforce_eager=True)
    return engine, model.cuda()


@pytest.mark.gpu
def test_vllm_engine_keeps_the_contract(vllm_engine_and_model):
    engine, model = vllm_engine_and_model
    check_contract(engine, model, atol=1e-3, seed=0)


@pytest.mark.gpu
def test_vllm_engine_samples_the_pushed_weights(vllm_engine_and_model):
    engine, model = vllm_engine_and_model
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    engine.sync_weights(model)
    check_contract(engine, model, atol=1e-3, seed=1)  # log-probs agree with the NEW weights
