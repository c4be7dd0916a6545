"""Rollout engines: one interface for sampling the student, backed by Hugging Face or vLLM.

The trainer asks an engine for a `RolloutBatch` and tells it after every rollout step that the student's
weights changed. Two engines implement it:

    HFEngine     the KV-cached loop of `eopd.rollout.sample` on the training model itself (CPU or GPU);
                 nothing to synchronise, the default.
    VLLMEngine   a vLLM `LLM` holding its own copy of the student (an optional extra, CUDA only): fast
                 generation; the trained weights are pushed into it after each update.

Whatever the engine, the batch records the sampler's log-probs, so the trainer can compare them with its
own recomputed ones (`rollout/sampler_kl_k3`, `rollout/sampler_ratio_mean`): the on-policy guard.

    engine = make_engine("hf")
    rollout = engine.generate(student, prompts, max_new_tokens=64, eos_token_ids=(eos,), pad_token_id=pad)
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from eopd.rollout import RolloutBatch, pad_prompts, sample

ENGINES = ("hf", "vllm")


@runtime_checkable
class RolloutEngine(Protocol):
    """What the trainer needs from a sampler.

    `generate` draws one response per prompt and returns a `RolloutBatch` whose `sampler_logprobs` are
    the log-probs of the drawn tokens under the distribution the engine sampled from (temperature and
    top-p applied). `sync_weights` is called after every rollout step's updates.
    """

    name: str

    def generate(
        self,
        model: torch.nn.Module,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        eos_token_ids: Sequence[int],
        pad_token_id: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        vocab_size: int | None = None,
        seed: int | None = None,
    ) -> RolloutBatch: ...

    def sync_weights(self, model: torch.nn.Module) -> None: ...


class HFEngine:
    """Samples with `eopd.rollout.sample` on the model being trained: always in sync, CPU or GPU."""

    name = "hf"

    def generate(
        self,
        model: torch.nn.Module,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        eos_token_ids: Sequence[int],
        pad_token_id: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        vocab_size: int | None = None,
        seed: int | None = None,
    ) -> RolloutBatch:
        """`eopd.rollout.sample`; `generator` is the random stream (`seed` is for engines without one)."""
        return sample(
            model,
            prompts,
            max_new_tokens=max_new_tokens,
            eos_token_ids=tuple(eos_token_ids),
            pad_token_id=pad_token_id,
            temperature=temperature,
            top_p=top_p,
            generator=generator,
            vocab_size=vocab_size,
        )

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Nothing to do: the engine samples from the training model itself."""


class VLLMEngine:
    """Samples with vLLM from its own copy of the student; `sync_weights` pushes the trained weights in.

    Needs the optional extra (`pip install -e '.[vllm]'`) and a CUDA device. vLLM loads the student from
    `model_path` (a Hugging Face directory or hub id) once; afterwards its weights are replaced in place
    from the training model's `state_dict` after every rollout step, so the engine samples from the
    current policy. Log-probs are requested after temperature and top-p ("processed_logprobs"), so that
    they are comparable with the trainer's; the remaining mismatch (kernels, bf16) is what the on-policy
    guard measures.

    Args:
        model_path: where vLLM loads the student from (its architecture and initial weights).
        dtype: vLLM's weight dtype ("bfloat16", "float16", "float32" or "auto").
        gpu_memory_utilization: the share of GPU memory vLLM may take (the trainer needs the rest).
        **llm_kwargs: passed on to `vllm.LLM` (e.g. max_model_len, enforce_eager).
    """

    name = "vllm"

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "bfloat16",
        gpu_memory_utilization: float = 0.3,
        **llm_kwargs: Any,
    ) -> None:
        if not vllm_available():
            raise ImportError(
                "rollout.engine=vllm needs the optional vLLM extra: pip install -e '.[vllm]' (CUDA only)"
            )
        import vllm

        self._vllm = vllm
        kwargs = dict(
            model=str(model_path),
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            skip_tokenizer_init=True,  # prompts arrive as token ids; responses leave as token ids
            **llm_kwargs,
        )
        try:
            self.llm = vllm.LLM(logprobs_mode="processed_logprobs", **kwargs)
        except TypeError:  # vLLM releases before logprobs_mode: log-probs of the raw distribution
            self.llm = vllm.LLM(**kwargs)

    def generate(
        self,
        model: torch.nn.Module,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        eos_token_ids: Sequence[int],
        pad_token_id: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        vocab_size: int | None = None,
        seed: int | None = None,
    ) -> RolloutBatch:
        """Sample with vLLM; the batch lands on the training model's device. `generator` is not used."""
        allowed = None if vocab_size is None else list(range(vocab_size))
        params = [  # a seed per request: equal prompts in one batch still draw independently
            self._vllm.SamplingParams(
                n=1,
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_new_tokens,
                stop_token_ids=list(eos_token_ids),
                logprobs=0,  # the drawn token's own log-prob
                seed=None if seed is None else seed * 100_003 + row,
                detokenize=False,
                allowed_token_ids=allowed,
            )
            for row in range(len(prompts))
        ]
        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        responses, logprobs, truncated = [], [], []
        for output in outputs:
            completion = output.outputs[0]
            ids = list(completion.token_ids)
            responses.append(ids)
            logprobs.append(
                [_drawn_logprob(step, token) for step, token in zip(completion.logprobs, ids, strict=True)]
            )
            truncated.append(completion.finish_reason == "length")
        device = next(model.parameters()).device
        return rollout_from_responses(
            prompts, responses, logprobs, truncated, pad_token_id=pad_token_id, device=device
        )

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Copy the training model's weights into vLLM's copy (names as in the Hugging Face checkpoint)."""
        weights = [(name, tensor.detach()) for name, tensor in model.state_dict().items()]

        def load(vllm_model: Any) -> None:
            vllm_model.load_weights(weights)

        if hasattr(self.llm, "apply_model"):
            self.llm.apply_model(load)
        else:  # older vLLM: the single in-process worker
            executor = self.llm.llm_engine.model_executor
            worker = executor.driver_worker
            runner = getattr(worker, "worker", worker).model_runner
            load(runner.model)


def _drawn_logprob(step: Any, token: int) -> float:
    """The log-prob of `token` from one position of a vLLM `logprobs` list (dict id -> Logprob)."""
    entry = step[token]
    return float(getattr(entry, "logprob", entry))


def rollout_from_responses(
    prompts: list[list[int]],
    responses: list[list[int]],
    logprobs: list[list[float]],
    truncated: list[bool],
    *,
    pad_token_id: int,
    device: torch.device | str = "cpu",
) -> RolloutBatch:
    """A `RolloutBatch` from per-row token lists, as an external engine returns them.

    Args:
        prompts: B prompts (token ids).
        responses: B responses, each ending in its end token unless truncated.
        logprobs: the sampler's log-prob of every response token, one list per row.
        truncated: True where the row hit the token limit without an end token.
        pad_token_id: id for both paddings.
        device: where the batch's tensors go.
    """
    if not len(prompts) == len(responses) == len(logprobs) == len(truncated):
        raise ValueError("prompts, responses, logprobs and truncated must have one entry per row")
    prompt_ids, prompt_mask = pad_prompts(prompts, pad_token_id)
    width = max(1, max(len(r) for r in responses))
    batch = len(responses)
    response_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((batch, width), dtype=torch.bool)
    sampler_logprobs = torch.zeros((batch, width), dtype=torch.float32)
    for row, (ids, logp) in enumerate(zip(responses, logprobs, strict=True)):
        if len(logp) != len(ids):
            raise ValueError(f"row {row}: {len(ids)} response tokens but {len(logp)} log-probs")
        response_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        response_mask[row, : len(ids)] = True
        sampler_logprobs[row, : len(ids)] = torch.as_tensor(logp, dtype=torch.float32)
    return RolloutBatch(
        input_ids=torch.cat([prompt_ids, response_ids], dim=1),
        attention_mask=torch.cat([prompt_mask, response_mask.long()], dim=1),
        response_mask=response_mask,
        prompt_length=prompt_ids.shape[1],
        truncated=torch.as_tensor(truncated, dtype=torch.bool),
        sampler_logprobs=sampler_logprobs,
    ).to(device)


def vllm_available() -> bool:
    """True when the vllm package is importable (the optional extra is installed)."""
    return importlib.util.find_spec("vllm") is not None


def make_engine(name: str, **options: Any) -> RolloutEngine:
    """The engine of a name in `ENGINES`; `options` go to its constructor (e.g. VLLMEngine's model_path)."""
    if name == "hf":
        if options:
            raise ValueError(f"rollout.engine=hf takes no engine options, got {sorted(options)}")
        return HFEngine()
    if name == "vllm":
        return VLLMEngine(**options)
    raise ValueError(f"rollout.engine={name!r} is unknown; allowed: {', '.join(ENGINES)}")


__all__ = [
    "ENGINES",
    "HFEngine",
    "RolloutEngine",
    "VLLMEngine",
    "make_engine",
    "rollout_from_responses",
    "vllm_available",
]
