"""The rollout engine contract: on the Hugging Face engine on CPU, and on vLLM where it and a GPU exist.

The vLLM engine's own decisions (what it asks of vLLM, the vocabulary cut, seeds, stop ids, the order of
sleep, push and prefix-cache reset) are checked on the CPU against a stand-in for the `vllm` module that
samples with the project's own sampler; the same contract runs on real vLLM in `make test-gpu`.
"""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import lightning as L
import pytest
import torch

import eopd.rollout_engines
from eopd.batch import RolloutBatch
from eopd.models import build_causal_lm
from eopd.module import DistillModule
from eopd.objectives import preset
from eopd.rollout import sample
from eopd.rollout_engines import (
    ENGINE_OWNED_LLM_ARGS,
    HFEngine,
    RolloutEngine,
    VLLMEngine,
    VLLMOptions,
    engine_weights,
    llm_arguments,
    make_engine,
    request_seed,
    rollout_from_responses,
    sampling_arguments,
    save_engine_copy,
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
            VLLMEngine("some/model", vocab_size=V)
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


# ---- vLLM: what the engine asks of vLLM (CPU) ---------------------------------------------------------


def test_sampling_arguments_stop_on_eopds_end_ids_only_and_mask_no_vocabulary():
    arguments = sampling_arguments(
        3, max_new_tokens=8, eos_token_ids=(EOS, 2), temperature=0.7, top_p=1.0, seed=5
    )
    assert len(arguments) == 3
    for kwargs in arguments:
        assert kwargs["stop_token_ids"] == [EOS, 2]
        # Without ignore_eos vLLM adds the end ids of the student's generation_config.json to these.
        assert kwargs["ignore_eos"] is True
        assert kwargs["logprobs"] == 0 and kwargs["detokenize"] is False
        # No per-request vocabulary list: vLLM's GPU runner refuses more than 1024 allowed ids.
        assert "allowed_token_ids" not in kwargs and "logit_bias" not in kwargs
    assert len({kwargs["seed"] for kwargs in arguments}) == 3
    with pytest.raises(ValueError, match="eos_token_ids is empty"):
        sampling_arguments(1, max_new_tokens=8, eos_token_ids=(), temperature=1.0, top_p=1.0, seed=0)


@pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed (pip install -e '.[vllm]')")
def test_real_sampling_params_keep_the_generation_configs_end_ids_out_of_the_stop_tokens():
    from vllm import SamplingParams

    kwargs = sampling_arguments(1, max_new_tokens=8, eos_token_ids=(EOS,), temperature=1.0, top_p=1.0, seed=0)
    params = SamplingParams(**kwargs[0])
    params.update_from_generation_config({"eos_token_id": [EOS, 7]}, 7)  # what vLLM does per request
    assert list(params.stop_token_ids) == [EOS]
    assert params.eos_token_id is None


@pytest.mark.parametrize("seed", [0, -3, 2**62, 2**64 + 5, 10**30])
def test_request_seeds_fit_int64_differ_by_row_and_reproduce(seed):
    seeds = [request_seed(seed, row) for row in range(256)]
    assert all(0 <= s < 2**63 for s in seeds)  # vLLM keeps request seeds in an int64 array
    assert len(set(seeds)) == 256  # equal prompts in one batch draw independently
    assert seeds == [request_seed(seed, row) for row in range(256)]  # a resumed step draws the same
    assert request_seed(seed + 1, 0) != seeds[0]


def test_the_trainers_largest_stream_seed_becomes_a_valid_request_seed():
    config_seed = 2**62  # a seed a user may well write; the trainer's stream multiplies it further
    stream = (config_seed * 1_000_003 + 10**6 * 101) * 7919
    assert stream > 2**64
    arguments = sampling_arguments(
        2, max_new_tokens=4, eos_token_ids=(EOS,), temperature=1.0, top_p=1.0, seed=stream
    )
    assert all(0 <= kwargs["seed"] < 2**63 for kwargs in arguments)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"dtype": "fp8"}, "rollout.engine_options.dtype='fp8' is unknown"),
        ({"gpu_memory_utilization": 1.0}, "gpu_memory_utilization=1.0 must lie in (0, 1)"),
        ({"gpu_memory_utilization": 0}, "gpu_memory_utilization=0 must lie in (0, 1)"),
        ({"sleep": "yes"}, "rollout.engine_options.sleep='yes' must be true or false"),
        ({"sleep_level": 3}, "rollout.engine_options.sleep_level=3 must be 1"),
        ({"max_model_len": 0}, "max_model_len=0 must be an integer >= 2"),
        ({"llm_kwargs": {"seed": 1, "tensor_parallel_size": 2}}, "sets seed, tensor_parallel_size"),
        ({"llm_kwargs": {"enable_sleep_mode": True}}, "use the fields of rollout.engine_options"),
    ],
)
def test_vllm_options_name_the_field_the_value_and_the_fix(fields, message):
    with pytest.raises(ValueError) as info:
        VLLMOptions(**fields)
    assert message in str(info.value)


def test_llm_arguments_keep_the_engine_in_process_with_processed_logprobs():
    options = VLLMOptions(sleep=False, max_model_len=96, llm_kwargs={"max_num_seqs": 8})
    kwargs = llm_arguments("/copy", options, seed=2**40 + 3)
    assert kwargs["distributed_executor_backend"] == "uni"  # one worker, in this process
    assert kwargs["logprobs_mode"] == "processed_logprobs"  # after temperature and top-p, as the trainer
    assert kwargs["generation_config"] == "vllm"  # no default sampling parameters from the student's file
    assert kwargs["skip_tokenizer_init"] is True
    assert kwargs["enable_sleep_mode"] is False and kwargs["max_model_len"] == 96
    assert 0 <= kwargs["seed"] < 2**32  # vLLM seeds NumPy with it
    assert kwargs["max_num_seqs"] == 8
    assert set(ENGINE_OWNED_LLM_ARGS) - {
        "tensor_parallel_size",
        "pipeline_parallel_size",
        "data_parallel_size",
    } <= set(kwargs)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_the_engines_copy_has_exactly_the_shared_vocabulary(tmp_path, tied):
    from transformers import AutoModelForCausalLM

    model = build_causal_lm(
        vocab_size=V + 8, hidden_size=32, num_layers=2, num_heads=4, seed=0, tie_word_embeddings=tied
    )
    save_engine_copy(model, tmp_path, V)
    assert json.loads((tmp_path / "config.json").read_text())["vocab_size"] == V
    copy = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        torch.testing.assert_close(copy(ids).logits, model.eval()(ids).logits[..., :V])


def test_pushed_weights_carry_checkpoint_names_and_cut_rows_without_copies():
    model = tiny_model(rows=V + 8)
    pushed = dict(engine_weights(model, V))
    state = model.state_dict()
    assert list(pushed) == list(state)  # the names vLLM's loaders map from a Hugging Face checkpoint
    for name, tensor in pushed.items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert tensor.shape[0] == V and torch.equal(tensor, state[name][:V])
        else:
            assert tensor.shape == state[name].shape
        assert tensor.data_ptr() == state[name].data_ptr()  # views of the live weights, no copies
    with pytest.raises(ValueError, match="exceeds the model's 48 embedding rows"):
        next(engine_weights(model, V + 9))


# ---- vLLM: the engine's steps, against a stand-in for the vllm module (CPU) --------------------------


class FakeLLM:
    """`vllm.LLM` as the engine uses it, sampling with eopd's own sampler from the copy it loaded.

    It follows vLLM where the engine depends on it (checked in vLLM 0.27-0.33): a request stops on its
    `stop_token_ids` and, unless `ignore_eos`, on the end ids of the model's generation_config.json; log-probs
    are those of the distribution sampled from (over the copy's rows); no request runs while asleep; the
    weights must be awake to be loaded; `load_weights` takes checkpoint names and refuses other shapes.
    """

    constructed = 0

    def __init__(self, **kwargs):
        FakeLLM.constructed += 1
        self.kwargs = kwargs
        self.multiprocessing_at_init = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
        from transformers import AutoModelForCausalLM

        path = Path(kwargs["model"])
        self.model = AutoModelForCausalLM.from_pretrained(path).eval()
        config_eos = json.loads((path / "generation_config.json").read_text()).get("eos_token_id")
        self.config_eos = [config_eos] if isinstance(config_eos, int) else list(config_eos or [])
        self.llm_engine = types.SimpleNamespace(model_executor=object())  # the core runs in process
        self.calls: list[str] = []
        self.asleep: set[str] = set()
        self.reset_succeeds = True

    def generate(self, requests, params, use_tqdm=False):
        assert not self.asleep, "vLLM does not schedule requests while any of its memory is asleep"
        self.calls.append("generate")
        # One batch for all requests (the stand-in draws from one stream; vLLM seeds each request).
        first = params[0]
        assert all(vars(p) == {**vars(first), "seed": p.seed} for p in params)
        stops = list(first.stop_token_ids) + ([] if first.ignore_eos else self.config_eos)
        batch = sample(
            self.model,
            [request["prompt_token_ids"] for request in requests],
            max_new_tokens=first.max_tokens,
            eos_token_ids=stops,
            pad_token_id=PAD,
            temperature=first.temperature,
            top_p=first.top_p,
            generator=torch.Generator().manual_seed(first.seed),
        )
        outputs = []
        for row in range(batch.batch_size):
            mask = batch.response_mask[row]
            ids = batch.responses[row][mask].tolist()
            logprobs = [
                {t: types.SimpleNamespace(logprob=lp)}
                for t, lp in zip(ids, batch.sampler_logprobs[row][mask].tolist(), strict=True)
            ]
            finish = "length" if bool(batch.truncated[row]) else "stop"
            completion = types.SimpleNamespace(token_ids=ids, logprobs=logprobs, finish_reason=finish)
            outputs.append(types.SimpleNamespace(outputs=[completion]))
        return outputs

    def apply_model(self, fn):
        assert "weights" not in self.asleep, "loading into weights that are asleep writes to freed memory"
        self.calls.append("apply_model")
        state = self.model.state_dict()

        class VLLMModel:
            @staticmethod
            def load_weights(weights):
                for name, tensor in weights:
                    assert state[name].shape == tensor.shape, f"{name}: {tuple(tensor.shape)}"
                    state[name].copy_(tensor)

        return [fn(VLLMModel())]

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")
        return self.reset_succeeds

    def sleep(self, level=1):
        self.calls.append(f"sleep({level})")
        self.asleep = {"weights", "kv_cache"}

    def wake_up(self, tags=None):
        self.calls.append(f"wake_up({tags})")
        self.asleep -= set(tags if tags is not None else self.asleep)


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM = FakeLLM
    module.SamplingParams = lambda **kwargs: types.SimpleNamespace(**kwargs)
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(eopd.rollout_engines, "vllm_available", lambda: True)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    FakeLLM.constructed = 0
    return module


def perturb(model, scale=0.3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))


@pytest.mark.parametrize("level", [1, 2])
def test_vllm_engine_samples_the_trained_weights_and_sleeps_around_each_push(fake_vllm, tmp_path, level):
    model = tiny_model(rows=V + 8)
    trained = tiny_model(rows=V + 8)
    perturb(trained, seed=1)  # trained on after the copy was written, as in a resumed run
    # End ids vLLM would add from the student's generation_config.json: the likeliest first tokens, so a
    # row would stop on one of them at once if the engine let vLLM add them.
    with torch.no_grad():
        firsts = [trained(torch.tensor([p])).logits[0, -1, :V].topk(3).indices.tolist() for p in PROMPTS]
    model.generation_config.eos_token_id = [EOS, *sorted({t for ids in firsts for t in ids} - {EOS})]
    copy = save_engine_copy(model, tmp_path / "copy", V)
    model = trained
    engine = VLLMEngine(copy, vocab_size=V, options={"sleep_level": level})
    llm = engine.llm

    check_contract(engine, model, seed=0)  # the first generation samples the model's current weights
    perturb(model, seed=2)
    engine.sync_weights(model)
    check_contract(engine, model, seed=1)  # and after a push, the pushed ones

    assert llm.calls == [
        "apply_model",
        "reset_prefix_cache",
        "generate",
        f"sleep({level})",
        "wake_up(['weights'])",
        "apply_model",
        "reset_prefix_cache",
        "wake_up(['kv_cache'])",
        "generate",
        f"sleep({level})",
    ]


def test_vllm_engine_pushes_before_sampling_when_level_2_sleep_discarded_its_weights(fake_vllm, tmp_path):
    model = tiny_model(rows=V + 8)
    engine = VLLMEngine(save_engine_copy(model, tmp_path, V), vocab_size=V, options={"sleep_level": 2})
    kwargs = dict(max_new_tokens=4, eos_token_ids=(EOS,), pad_token_id=PAD, seed=0)
    engine.generate(model, PROMPTS, **kwargs)
    engine.generate(model, PROMPTS, **kwargs)  # no sync_weights in between: vLLM holds no weights now
    assert engine.llm.calls[4:] == [
        "wake_up(['weights'])",
        "apply_model",
        "reset_prefix_cache",
        "wake_up(['kv_cache'])",
        "generate",
        "sleep(2)",
    ]


def test_vllm_engine_without_sleep_pushes_and_resets_only(fake_vllm, tmp_path):
    model = tiny_model(rows=V + 8)
    engine = VLLMEngine(save_engine_copy(model, tmp_path, V), vocab_size=V, options=VLLMOptions(sleep=False))
    kwargs = dict(max_new_tokens=4, eos_token_ids=(EOS,), pad_token_id=PAD, seed=0)
    engine.generate(model, PROMPTS, **kwargs)
    engine.sync_weights(model)
    engine.generate(model, PROMPTS, **kwargs)
    assert engine.llm.calls == ["apply_model", "reset_prefix_cache", "generate"] * 2
    assert engine.llm.kwargs["enable_sleep_mode"] is False


def test_vllm_engine_is_built_once_in_process(fake_vllm, tmp_path, monkeypatch):
    model = tiny_model(rows=V + 8)
    copy = save_engine_copy(model, tmp_path, V)
    engine = VLLMEngine(copy, vocab_size=V, seed=7)
    assert FakeLLM.constructed == 1
    assert engine.llm.multiprocessing_at_init == "0"  # vLLM's core in this process: weights can be pushed
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ  # and the setting does not outlive the build

    class Broken(FakeLLM):
        def __init__(self, **kwargs):
            FakeLLM.constructed += 1
            raise TypeError("an unrelated error inside vLLM")

    monkeypatch.setattr(fake_vllm, "LLM", Broken)
    FakeLLM.constructed = 0
    with pytest.raises(TypeError, match="unrelated"):
        VLLMEngine(copy, vocab_size=V)
    assert FakeLLM.constructed == 1  # no second engine built behind the error


def test_vllm_engine_refuses_what_it_cannot_serve(fake_vllm, tmp_path):
    model = tiny_model(rows=V + 8)
    model.save_pretrained(tmp_path / "uncut")
    with pytest.raises(
        ValueError, match=r"vocab_size=48, not the shared 40: write it with .*save_engine_copy"
    ):
        VLLMEngine(tmp_path / "uncut", vocab_size=V)
    assert FakeLLM.constructed == 0  # refused before vLLM starts
    engine = VLLMEngine(save_engine_copy(model, tmp_path / "copy", V), vocab_size=V)
    engine.llm.reset_succeeds = False
    with pytest.raises(RuntimeError, match="could not reset its prefix cache"):
        engine.sync_weights(model)
    with pytest.raises(ValueError, match="vocab_size=41, but the engine's copy has 40 rows"):
        engine.generate(
            model, PROMPTS, max_new_tokens=2, eos_token_ids=(EOS,), pad_token_id=PAD, vocab_size=41
        )


def test_vllm_engine_refuses_a_lora_student(fake_vllm, tmp_path):
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    model = tiny_model(rows=V + 8)
    engine = VLLMEngine(save_engine_copy(model, tmp_path, V), vocab_size=V)
    student = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="LoRA .* use rollout.engine=hf"):
        engine.sync_weights(student)
    assert "apply_model" not in engine.llm.calls


def run_sync_check(capsys, monkeypatch, *args) -> tuple[int, str]:
    """scripts/check_vllm_sync.py on the CPU, against the stand-in for vllm."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "scripts" / "check_vllm_sync.py"
    spec = importlib.util.spec_from_file_location("check_vllm_sync", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(script, "vllm_available", lambda: True)
    small = ["--vocab", "256", "--hidden-size", "32", "--prompts", "4", "--max-new-tokens", "8"]
    argv = ["check_vllm_sync.py", "--device", "cpu", *small, *args]
    monkeypatch.setattr(sys, "argv", argv)
    code = script.main()
    return code, capsys.readouterr().out


def test_the_gpu_sync_check_passes_a_working_push_and_fails_a_lost_one(fake_vllm, capsys, monkeypatch):
    code, out = run_sync_check(capsys, monkeypatch)
    assert code == 0, out
    for line in ("in sync", "stale (no push)", "pushed", "pushed, again", "OK"):
        assert line in out

    push = VLLMEngine.sync_weights

    def first_push_only(self, model):  # later pushes never reach vLLM's copy
        if not self._pushed:
            push(self, model)

    monkeypatch.setattr(VLLMEngine, "sync_weights", first_push_only)
    code, out = run_sync_check(capsys, monkeypatch)
    assert code == 1 and "FAILED" in out


# ---- vLLM on a GPU (make test-gpu) ---------------------------------------------------------------------
#
# These have not run yet: no GPU was available when they were written (docs/vllm.md).

GPU_VOCAB = 2048  # above vLLM's limit of 1024 allowed ids per request, which the engine must not hit
GPU_ROWS = GPU_VOCAB + 64  # padded output rows past the shared vocabulary, as in real checkpoints


def gpu_model(seed=0):
    model = build_causal_lm(vocab_size=GPU_ROWS, hidden_size=256, num_layers=2, num_heads=4, seed=seed)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(4)
    return model


def long_prompts(count=8, shared=40, own=9, seed=0):
    """Prompts longer than one KV-cache block (16 tokens) that share a 40-token prefix: prefix-cache hits."""
    generator = torch.Generator().manual_seed(seed)
    prefix = torch.randint(2, GPU_VOCAB, (shared,), generator=generator).tolist()
    return [
        prefix + torch.randint(2, GPU_VOCAB, (own + i,), generator=generator).tolist() for i in range(count)
    ]


@pytest.fixture(scope="module")
def vllm_engine_and_model(tmp_path_factory):
    if not vllm_available():
        pytest.skip("vLLM is not installed (pip install -e '.[vllm]')")
    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a CUDA device")
    model = gpu_model()
    # End ids vLLM would add from generation_config.json unless the engine stops it: rows would end early.
    model.generation_config.eos_token_id = [EOS, *range(2, 66)]
    copy = save_engine_copy(model, tmp_path_factory.mktemp("student"), GPU_VOCAB)
    options = VLLMOptions(dtype="float32", gpu_memory_utilization=0.2, enforce_eager=True, max_model_len=256)
    engine = VLLMEngine(copy, vocab_size=GPU_VOCAB, options=options)
    return engine, model.cuda()


def gpu_rollout(engine, model, prompts, seed, temperature=0.7):
    batch = engine.generate(
        model,
        prompts,
        max_new_tokens=24,
        eos_token_ids=(EOS,),
        pad_token_id=PAD,
        temperature=temperature,
        vocab_size=GPU_VOCAB,
        seed=seed,
    )
    expected = recomputed_logprobs(model, batch, temperature, GPU_VOCAB)
    return batch, expected


@pytest.mark.gpu
def test_vllm_engine_keeps_the_contract_over_a_vocabulary_above_1024_ids(vllm_engine_and_model):
    engine, model = vllm_engine_and_model
    batch, expected = gpu_rollout(engine, model, long_prompts(), seed=0)
    mask = batch.response_mask
    assert int(batch.responses[mask].max()) < GPU_VOCAB  # never a padded row
    torch.testing.assert_close(batch.sampler_logprobs[mask], expected[mask], atol=1e-3, rtol=0)


@pytest.mark.gpu
def test_vllm_engine_samples_the_pushed_weights_with_cached_prefixes(vllm_engine_and_model):
    engine, model = vllm_engine_and_model
    prompts = long_prompts(seed=1)
    gpu_rollout(engine, model, prompts, seed=1)  # fills the prefix cache with the old weights' blocks
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    engine.sync_weights(model)
    batch, expected = gpu_rollout(engine, model, prompts, seed=2)  # the same prompts after the update
    mask = batch.response_mask
    # Stale prompt blocks would give log-probs of the old weights: far from the trainer's at 1e-3.
    torch.testing.assert_close(batch.sampler_logprobs[mask], expected[mask], atol=1e-3, rtol=0)
    log_ratio = (expected - batch.sampler_logprobs)[mask]
    assert float((torch.expm1(log_ratio) - log_ratio).mean()) < 1e-4  # rollout/sampler_kl_k3


@pytest.mark.gpu
def test_vllm_engine_rows_end_on_eopds_end_id_only(vllm_engine_and_model):
    engine, model = vllm_engine_and_model
    batch, _ = gpu_rollout(engine, model, long_prompts(seed=3), seed=3, temperature=1.0)
    for row in range(batch.batch_size):
        ids = batch.responses[row][batch.response_mask[row]].tolist()
        assert (ids[-1] == EOS) != bool(batch.truncated[row])
        assert EOS not in ids[:-1]
