"""Rollout engines: one interface for sampling the student, backed by Hugging Face or vLLM.

The trainer asks an engine for a `RolloutBatch` and tells it after every rollout step that the student's
weights changed. Two engines implement it:

    HFEngine     the KV-cached loop of `eopd.rollout.sample` on the training model itself (CPU or GPU);
                 nothing to synchronise, the default.
    VLLMEngine   a vLLM `LLM` in this process holding its own copy of the student (an optional extra,
                 one CUDA device): fast generation; the trained weights are pushed into it after each
                 update, and it sleeps while the teacher scores and the student trains (docs/vllm.md).

Whatever the engine, the batch records the sampler's log-probs, so the trainer can compare them with its
own recomputed ones (`rollout/sampler_kl_k3`, `rollout/sampler_ratio_mean`): the on-policy guard.

    engine = make_engine("hf")
    rollout = engine.generate(student, prompts, max_new_tokens=64, eos_token_ids=(eos,), pad_token_id=pad)
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from eopd.batch import RolloutBatch, pad_prompts
from eopd.rollout import sample
from eopd.vllm_config import (
    ENGINE_OWNED_LLM_ARGS,
    VLLMOptions,
    engine_weights,
    llm_arguments,
    request_seed,
    sampling_arguments,
    save_engine_copy,
)

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


# ---- vLLM --------------------------------------------------------------------------------------------


@contextmanager
def _engine_core_in_this_process() -> Iterator[None]:
    """vLLM reads VLLM_ENABLE_V1_MULTIPROCESSING when the engine is built; 0 keeps its core here."""
    name = "VLLM_ENABLE_V1_MULTIPROCESSING"
    before = os.environ.get(name)
    os.environ[name] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


class VLLMEngine:
    """Samples with vLLM from its own copy of the student; `sync_weights` pushes the trained weights in.

    Needs the optional extra (`pip install -e '.[vllm]'`, vLLM 0.27-0.32) and one CUDA device. How it
    works, and why (each point checked against vLLM's source; docs/vllm.md has the details):

    - The engine runs in this process (`llm_arguments`): vLLM's core, its one worker and its model live
      next to the trainer, so `sync_weights` calls the vLLM model's own `load_weights` on the trainer's
      tensors through `LLM.apply_model`. With vLLM's default multiprocessing the model would be in a
      child process, where a function cannot be sent (vLLM refuses to serialise one) and the trainer's
      GPU tensors could not be read. vLLM's weight-transfer API is built for a trainer in another
      process (NCCL, CUDA IPC); in one process it would only add a copy.
    - After every push the prefix cache is reset, so no prompt block computed with the old weights is
      reused; a reset that fails (requests still running) is an error.
    - The copy vLLM loads has exactly the shared vocabulary (`save_engine_copy`); pushes cut the padded
      rows the same way (`engine_weights`).
    - Rows stop on eopd's end ids only (`sampling_arguments`); per-request seeds stay in int64.
    - With `options.sleep`, the engine sleeps after each generation, wakes its weights for the push and
      its KV cache for the next generation.
    - The first `generate` pushes the model's weights before sampling, so a run resumed from a
      checkpoint samples from the restored weights, not from the copy saved at start; so does a
      `generate` after a level-2 sleep without a push in between, since vLLM discarded its weights.

    Refused: a LoRA (peft) student, whose names are not the checkpoint's, and more than one process
    (`torch.distributed` world size > 1), since every process's engine would take the first GPU.

    Args:
        model_path: the copy of the student vLLM loads (its architecture and first weights), written by
            `save_engine_copy` with `vocab_size` rows.
        vocab_size: the shared vocabulary size: the rows of that copy.
        options: how vLLM runs (`VLLMOptions`, or its fields as a dict).
        seed: seeds vLLM's global generators (the sampling itself is seeded per request).
    """

    name = "vllm"

    def __init__(
        self,
        model_path: str | Path,
        *,
        vocab_size: int,
        options: VLLMOptions | dict[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        if isinstance(options, dict):
            options = VLLMOptions(**options)
        self.options = options or VLLMOptions()
        if not vllm_available():
            raise ImportError(
                "rollout.engine=vllm needs the optional vLLM extra: pip install -e '.[vllm]' (CUDA only)"
            )
        _refuse_several_processes()
        copy_vocab = json.loads((Path(model_path) / "config.json").read_text()).get("vocab_size")
        if copy_vocab != vocab_size:
            raise ValueError(
                f"the engine's copy of the student in {model_path} has vocab_size={copy_vocab}, not the shared "
                f"{vocab_size}: write it with eopd.rollout_engines.save_engine_copy(model, path, {vocab_size})"
            )
        import vllm

        self._vllm = vllm
        self.vocab_size = vocab_size
        with _engine_core_in_this_process():
            self.llm = vllm.LLM(**llm_arguments(str(model_path), self.options, seed=seed))
        if getattr(self.llm.llm_engine, "model_executor", None) is None:
            raise RuntimeError(
                "vLLM started its engine core in another process, so weights cannot be pushed into it; "
                "this vLLM release is not supported by eopd (pip install -e '.[vllm]' installs one that is)"
            )
        self._asleep: set[str] = set()  # what of vLLM's GPU memory is asleep: "weights", "kv_cache"
        self._pushed = False

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
        if vocab_size is not None and vocab_size != self.vocab_size:
            raise ValueError(f"vocab_size={vocab_size}, but the engine's copy has {self.vocab_size} rows")
        weights_discarded = self.options.sleep_level == 2 and "weights" in self._asleep
        if not self._pushed or weights_discarded:  # the copy on disk may be older (a resumed run)
            self.sync_weights(model)
        self._wake(("weights", "kv_cache"))
        arguments = sampling_arguments(
            len(prompts),
            max_new_tokens=max_new_tokens,
            eos_token_ids=eos_token_ids,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
        )
        params = [self._vllm.SamplingParams(**kwargs) for kwargs in arguments]
        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        if self.options.sleep:  # teacher scoring and the update get vLLM's memory until the push
            self.llm.sleep(level=self.options.sleep_level)
            self._asleep = {"weights", "kv_cache"}
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
        """Push the training model's weights into vLLM's copy, then reset vLLM's prefix cache."""
        _refuse_peft(model)
        _refuse_several_processes()
        self._wake(("weights",))  # the KV cache stays asleep until the next generation
        weights = engine_weights(model, self.vocab_size)

        def load(vllm_model: torch.nn.Module) -> None:
            vllm_model.load_weights(weights)  # vLLM's loader maps checkpoint names onto its fused layers

        self.llm.apply_model(load)
        if not self.llm.reset_prefix_cache():
            raise RuntimeError(
                "vLLM could not reset its prefix cache after the weight push (requests still running): the "
                "next rollout would reuse prompt blocks computed with the old weights"
            )
        self._pushed = True

    def _wake(self, tags: tuple[str, ...]) -> None:
        asleep = [tag for tag in tags if tag in self._asleep]
        if asleep:
            self.llm.wake_up(tags=asleep)
            self._asleep -= set(asleep)


def _drawn_logprob(step: Any, token: int) -> float:
    """The log-prob of `token` from one position of a vLLM `logprobs` list (dict id -> Logprob)."""
    entry = step[token]
    return float(getattr(entry, "logprob", entry))


def _refuse_peft(model: torch.nn.Module) -> None:
    if hasattr(model, "peft_config"):
        raise ValueError(
            "the vLLM engine cannot take a LoRA (peft) student: its parameter names are not the checkpoint's "
            "and its saved directory holds only the adapter; use rollout.engine=hf, or train without "
            "pair.student.lora"
        )


def _refuse_several_processes() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        if world > 1:
            raise RuntimeError(
                f"the vLLM engine runs in one process on the first GPU, but this run has {world} processes "
                "(DDP/FSDP): use rollout.engine=hf, or train on one GPU (trainer=gpu)"
            )


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
    """The engine of a name in `ENGINES`; `options` go to its constructor (VLLMEngine: model_path, ...)."""
    if name == "hf":
        if options:
            raise ValueError(f"rollout.engine=hf takes no engine options, got {sorted(options)}")
        return HFEngine()
    if name == "vllm":
        return VLLMEngine(**options)
    raise ValueError(f"rollout.engine={name!r} is unknown; allowed: {', '.join(ENGINES)}")


__all__ = [
    "ENGINES",
    "ENGINE_OWNED_LLM_ARGS",
    "HFEngine",
    "RolloutEngine",
    "VLLMEngine",
    "VLLMOptions",
    "engine_weights",
    "llm_arguments",
    "make_engine",
    "request_seed",
    "rollout_from_responses",
    "sampling_arguments",
    "save_engine_copy",
    "vllm_available",
]
