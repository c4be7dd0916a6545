"""What eopd hands to vLLM: the engine options, the `LLM` and sampling arguments, request seeds, the weights copy.

Kept apart from `eopd.rollout_engines` (the engines themselves) so that the options can be built and
checked from a config on any machine, without vLLM installed (docs/vllm.md).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SLEEP_LEVELS = (1, 2)
VLLM_DTYPES = ("auto", "bfloat16", "float16", "float32")
# vllm.LLM arguments the engine sets itself: each is either fixed by how the engine works or has its own
# field in VLLMOptions. The parallel sizes are refused because the engine is one in-process worker.
ENGINE_OWNED_LLM_ARGS = (
    "model",
    "dtype",
    "gpu_memory_utilization",
    "skip_tokenizer_init",
    "logprobs_mode",
    "generation_config",
    "distributed_executor_backend",
    "enable_sleep_mode",
    "seed",
    "max_model_len",
    "enforce_eager",
    "enable_prefix_caching",
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "data_parallel_size",
)


@dataclass(frozen=True)
class VLLMOptions:
    """How the vLLM engine runs (`rollout.engine_options` in the config); checked when built.

    Attributes:
        dtype: vLLM's weight dtype: "bfloat16" (the default), "float16", "float32" or "auto" (the
            checkpoint's). The trainer's log-probs are compared with vLLM's every step, so a dtype coarser
            than the trainer's shows up in `rollout/sampler_kl_k3`.
        gpu_memory_utilization: the share of the GPU's total memory vLLM may take for its weights and KV
            cache, in (0, 1). The student, the teacher and the optimizer state need the rest while vLLM
            is awake; with `sleep` most of vLLM's share is handed back between generations.
        sleep: put the engine to sleep after each generation (`LLM.sleep`), so that teacher scoring and
            the update have the GPU memory that vLLM's KV cache (and, at level 1, its weights) took. The
            weights wake up for the push after the update and the KV cache for the next generation.
            Needs vLLM's sleep mode (CUDA); False keeps everything resident.
        sleep_level: 1 offloads vLLM's weights to CPU memory (one copy of the student in pinned host
            memory) and discards the KV cache; 2 discards the weights too, since every weight is pushed
            again before the next generation. Level 1 is the default: whatever the push does not cover
            (buffers, state derived after loading) comes back as it was; level 2 saves the host memory.
        max_model_len: the longest prompt + response vLLM reserves room for; None = the training run's
            `data.max_prompt_tokens + rollout.max_new_tokens` when built by `eopd.train`, else the
            model's own context length.
        enforce_eager: skip CUDA graphs (slower decoding, faster start, less memory).
        enable_prefix_caching: reuse the KV cache of prompt prefixes shared between requests. The cache
            is reset after every weight push, so no block computed with old weights is reused.
        llm_kwargs: further `vllm.LLM` arguments (e.g. `max_num_seqs`, `kv_cache_dtype`). Those the
            engine sets itself (`ENGINE_OWNED_LLM_ARGS`) are refused: use the fields above.
    """

    dtype: str = "bfloat16"
    gpu_memory_utilization: float = 0.3
    sleep: bool = True
    sleep_level: int = 1
    max_model_len: int | None = None
    enforce_eager: bool = False
    enable_prefix_caching: bool = True
    llm_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        key = "rollout.engine_options"
        if self.dtype not in VLLM_DTYPES:
            raise ValueError(
                f"{key}.dtype={self.dtype!r} is unknown; allowed: {', '.join(VLLM_DTYPES)} (bfloat16 is the default)"
            )
        if isinstance(self.gpu_memory_utilization, bool) or not 0.0 < self.gpu_memory_utilization < 1.0:
            raise ValueError(
                f"{key}.gpu_memory_utilization={self.gpu_memory_utilization!r} must lie in (0, 1): the share "
                "of the GPU vLLM may take (0.3 leaves 70% to the student, teacher and optimizer)"
            )
        for name in ("sleep", "enforce_eager", "enable_prefix_caching"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{key}.{name}={getattr(self, name)!r} must be true or false")
        if self.sleep_level not in SLEEP_LEVELS or isinstance(self.sleep_level, bool):
            raise ValueError(
                f"{key}.sleep_level={self.sleep_level!r} must be 1 (offload vLLM's weights to CPU memory) or "
                "2 (discard them: every weight is pushed again before the next generation)"
            )
        if self.max_model_len is not None and (
            not isinstance(self.max_model_len, int)
            or isinstance(self.max_model_len, bool)
            or self.max_model_len < 2
        ):
            raise ValueError(
                f"{key}.max_model_len={self.max_model_len!r} must be an integer >= 2 (prompt + response "
                "tokens), or null for the run's data.max_prompt_tokens + rollout.max_new_tokens"
            )
        if not isinstance(self.llm_kwargs, dict):
            raise ValueError(f"{key}.llm_kwargs={self.llm_kwargs!r} must be a mapping of vllm.LLM arguments")
        owned = sorted(set(self.llm_kwargs) & set(ENGINE_OWNED_LLM_ARGS))
        if owned:
            raise ValueError(
                f"{key}.llm_kwargs sets {', '.join(owned)}, which the engine sets itself: use the fields of "
                f"{key} (dtype, gpu_memory_utilization, max_model_len, enforce_eager, enable_prefix_caching) "
                "and drop the rest; the engine runs one in-process worker, so no parallel sizes"
            )


def llm_arguments(model_path: str, options: VLLMOptions, *, seed: int) -> dict[str, Any]:
    """The keyword arguments of `vllm.LLM` for the engine: checked against vLLM 0.27-0.32.

    - `distributed_executor_backend="uni"` (one worker) and, set by `VLLMEngine` around the constructor,
      `VLLM_ENABLE_V1_MULTIPROCESSING=0`: the engine core runs in this process, so the weight push is a
      plain function call on vLLM's model (`LLM.apply_model`), with no serialisation and no copy.
    - `skip_tokenizer_init`: prompts arrive and responses leave as token ids.
    - `logprobs_mode="processed_logprobs"`: the drawn tokens' log-probs after temperature and top-p, the
      distribution the trainer recomputes.
    - `generation_config="vllm"`: the student's generation_config.json sets no default sampling
      parameters. It does not stop vLLM from adding that file's end ids to the stop tokens (vLLM still
      reads them, `ModelConfig.try_get_generation_config`); `sampling_arguments` sets `ignore_eos` for that.
    - `seed`: vLLM seeds Python's, NumPy's and torch's global generators with it when it runs in process;
      NumPy takes 32 bits.
    """
    return dict(
        model=str(model_path),
        dtype=options.dtype,
        gpu_memory_utilization=options.gpu_memory_utilization,
        skip_tokenizer_init=True,
        logprobs_mode="processed_logprobs",
        generation_config="vllm",
        distributed_executor_backend="uni",
        enable_sleep_mode=options.sleep,
        seed=seed % 2**32,
        max_model_len=options.max_model_len,
        enforce_eager=options.enforce_eager,
        enable_prefix_caching=options.enable_prefix_caching,
        **options.llm_kwargs,
    )


def request_seed(seed: int, row: int) -> int:
    """A per-request sampling seed in [0, 2**63): vLLM keeps request seeds in an int64 array.

    Any integer `seed` (negative or beyond 64 bits) and row give a well-mixed, reproducible value, so
    equal prompts in one batch still draw independently and the same step draws the same after a resume.
    """
    digest = hashlib.blake2b(f"{seed}/{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sampling_arguments(
    num_prompts: int,
    *,
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    temperature: float,
    top_p: float,
    seed: int | None,
) -> list[dict[str, Any]]:
    """The keyword arguments of one `vllm.SamplingParams` per prompt.

    A row ends on eopd's end ids only: `stop_token_ids` are exactly `eos_token_ids`, and `ignore_eos`
    keeps vLLM from adding the end ids of the student's generation_config.json (vLLM's
    `SamplingParams.update_from_generation_config` adds them to the stop tokens unless `ignore_eos`;
    with `ignore_eos` it records them only for `min_tokens`, which is 0 here). No `allowed_token_ids` or
    `logit_bias`: the engine's copy of the student has exactly the shared vocabulary (see
    `save_engine_copy`), so there are no padded rows to mask.
    """
    if not eos_token_ids:
        raise ValueError("eos_token_ids is empty: a response would only stop at max_new_tokens")
    return [
        dict(
            n=1,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_new_tokens,
            ignore_eos=True,
            stop_token_ids=list(eos_token_ids),
            logprobs=0,  # the drawn token's own log-prob
            seed=None if seed is None else request_seed(seed, row),
            detokenize=False,
        )
        for row in range(num_prompts)
    ]


def engine_weights(model: torch.nn.Module, vocab_size: int) -> Iterator[tuple[str, torch.Tensor]]:
    """The training model's weights as the engine's copy holds them: Hugging Face names, vocabulary rows cut.

    The embedding and output layers (and an output bias) keep their first `vocab_size` rows: the rows past
    the shared vocabulary are padding no tokenizer produces, and the engine's copy does not have them.
    Everything else is the `state_dict` as it is (views, no copies).

    Args:
        model: a Hugging Face causal LM (not a peft model: its names differ from the checkpoint's).
        vocab_size: the shared vocabulary size; at most the rows of the embedding.
    """
    row_tensors = []
    for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
        if layer is not None:
            row_tensors += [t for t in (layer.weight, getattr(layer, "bias", None)) if t is not None]
    rows = {t.data_ptr() for t in row_tensors}
    embedding_rows = model.get_input_embeddings().weight.shape[0]
    if vocab_size > embedding_rows:
        raise ValueError(f"vocab_size={vocab_size} exceeds the model's {embedding_rows} embedding rows")
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach()
        if tensor.data_ptr() in rows and tensor.shape[0] > vocab_size:
            tensor = tensor[:vocab_size]  # (vocab_size, ...)
        yield name, tensor


def save_engine_copy(model: torch.nn.Module, directory: Path | str, vocab_size: int) -> Path:
    """Save the copy of the student that vLLM loads: the model with exactly `vocab_size` output rows.

    vLLM samples from every output row of the checkpoint it loads (`config.vocab_size`). Cutting the
    padded rows here keeps them out of its samples and out of its log-prob normalisation, which the
    trainer computes over the shared vocabulary, for any vocabulary size: `allowed_token_ids` or
    `logit_bias` over the vocabulary would hit vLLM's limit of 1024 ids per request in its GPU model
    runner (vllm/v1/worker/gpu/sample/logit_bias.py, 0.27-0.33).

    Returns:
        `directory`.
    """
    directory = Path(directory)
    full = model.state_dict()
    weights = {  # the cut rows in their own storage; the rest as they are (no second copy of the model)
        name: tensor.cpu() if tensor.shape == full[name].shape else tensor.cpu().clone()
        for name, tensor in engine_weights(model, vocab_size)
    }
    model.save_pretrained(directory, state_dict=weights)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["vocab_size"] = vocab_size
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return directory
