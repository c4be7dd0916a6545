"""Building and loading models, the teacher/student vocabulary check, LoRA, and saving the student.

Scoring a loaded model (hidden states, output layers, the end-token remap) is in `eopd.scoring`.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from eopd.conversion import GgufSource
from eopd.pruning import StudentInit
from eopd.scoring import is_peft, output_weight

# transformers' modeling code takes seconds to import: it is imported where a model is built or loaded.
if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# The families `build_causal_lm` builds: transformers config and model class names.
_FAMILIES = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
}


def _require_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def build_causal_lm(
    *,
    family: str = "qwen3",
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> PreTrainedModel:
    """Build a randomly initialised causal LM from a transformers config, the same weights for a seed.

    Meant for tests, toy experiments and pretraining small teachers; real pairs are loaded with
    `AutoModelForCausalLM.from_pretrained`.

    Args:
        family: "qwen3" (Qwen3Config) or "llama" (LlamaConfig).
        vocab_size: rows of the embedding and output matrices.
        hidden_size: model width; must be divisible by `num_heads`.
        num_layers: decoder layers.
        num_heads: query heads.
        num_kv_heads: key/value heads (grouped-query attention); defaults to `num_heads`. Must divide
            `num_heads`.
        intermediate_size: MLP width; defaults to `4 * hidden_size`.
        max_position_embeddings: longest sequence the rotary embedding is configured for.
        tie_word_embeddings: share the input embedding with the output layer.
        seed: seeds the weight initialisation (the global RNG state is restored afterwards).
        bos_token_id, eos_token_id, pad_token_id: written into the config (and generation config).

    Returns:
        The model in training mode, float32, on the CPU.

    Raises:
        ValueError: naming the offending argument.
    """
    if family not in _FAMILIES:
        raise ValueError(f"family must be one of {sorted(_FAMILIES)}, got {family!r}")
    for name, value in [
        ("vocab_size", vocab_size),
        ("hidden_size", hidden_size),
        ("num_layers", num_layers),
        ("num_heads", num_heads),
        ("max_position_embeddings", max_position_embeddings),
    ]:
        _require_positive(name, value)
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    intermediate_size = 4 * hidden_size if intermediate_size is None else intermediate_size
    _require_positive("num_kv_heads", num_kv_heads)
    _require_positive("intermediate_size", intermediate_size)
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads})")
    special_ids = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
    for name, token_id in special_ids.items():
        if token_id is not None and not 0 <= token_id < vocab_size:
            raise ValueError(f"{name} must lie in [0, vocab_size={vocab_size}), got {token_id}")

    import transformers

    config_class, model_class = (getattr(transformers, name) for name in _FAMILIES[family])
    config = config_class(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        # Qwen3Config defaults head_dim to 128 regardless of width; tie it to the width instead.
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    # fork_rng keeps building a model from disturbing the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    return model


def has_active_dropout(model: torch.nn.Module) -> bool:
    """Whether a training-mode forward of `model` can differ from its eval-mode forward through dropout.

    Counts dropout modules with p > 0 (LoRA's included) and the dropout rates a Hugging Face config hands
    to functional calls (`attention_dropout`, `hidden_dropout`, `resid_pdrop`, ...).
    """
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            return True
    config = getattr(model, "config", None)
    if config is None:
        return False
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name, value in vars(config).items():
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ("dropout" in name or name.endswith("pdrop")) and numeric and value > 0:
            return True
    return False


def vocab_size_of(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None) -> int:
    """The effective vocabulary size: the ids a model can really be asked about.

    Embedding matrices are often padded beyond the tokenizer (Qwen3: 151936 rows for 151669 tokens), and
    the padded rows are never produced by the tokenizer. With a tokenizer this is `len(tokenizer)`;
    without one, the rows of the output layer.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer, if there is one.
    """
    if tokenizer is not None:
        return len(tokenizer)
    return output_weight(model).shape[0]


class VocabularyMismatchError(ValueError):
    """The student and teacher tokenizers do not map text and ids the same way."""


DEFAULT_PROBES: tuple[str, ...] = (
    "Let's think step by step and output the final answer within \\boxed{}.",
    "Find all real x such that x^2 - 5x + 6 = 0. The answer is $\\boxed{2, 3}$.",
    "  leading spaces,\ttabs\nand\n\nnewlines  ",
    "1234567890 3.14159 -42 1e-9 1/2 \\frac{a}{b} \\sqrt{2} \\int_0^1 x\\,dx",
    "def f(x):\n    return {'a': [x, x ** 2]}  # code",
    "Ünïcödé: naïve café, Ωμέγα, Привет, 数学问题, 🙂",
)
"""Text the two tokenizers must split into the same ids: prose, LaTeX, digits, whitespace, code, Unicode."""


def _first_difference(left: Sequence[int], right: Sequence[int]) -> int:
    for position, (a, b) in enumerate(zip(left, right, strict=False)):
        if a != b:
            return position
    return min(len(left), len(right))


def _describe_token_at(tokenizer: PreTrainedTokenizerBase, ids: list[int], position: int) -> str:
    if position >= len(ids):
        return f"<end of encoding after {len(ids)} tokens>"
    return f"id {ids[position]} {tokenizer.convert_ids_to_tokens(ids[position])!r}"


def check_shared_vocabulary(
    student_tokenizer: PreTrainedTokenizerBase,
    teacher_tokenizer: PreTrainedTokenizerBase,
    probes: Sequence[str] = DEFAULT_PROBES,
    *,
    ignore_ids: Collection[int] = (),
) -> int:
    """Check that student and teacher share one vocabulary, so that logits can be compared id by id.

    Three checks, each naming what differs: the same token string at every id of `get_vocab()` (the
    error names the first differing id and both strings); the same `len()`; the same ids for every probe
    string (encoded without special tokens), which catches normalisers and pre-tokenizers that differ.

    Args:
        student_tokenizer: the student's tokenizer.
        teacher_tokenizer: the teacher's tokenizer.
        probes: strings both must encode identically.
        ignore_ids: ids whose token strings may differ in the whole-vocabulary check, e.g. special tokens
            that `remap_end_token` translates. They are not skipped in the probe check, so keep special
            tokens out of the probes.

    Returns:
        The shared vocabulary size, `len(student_tokenizer)`.

    Raises:
        VocabularyMismatchError: on the first difference found.
    """
    size, teacher_size = len(student_tokenizer), len(teacher_tokenizer)
    # Id by id first: a mismatched pair is named by its first differing token, whatever else differs.
    student_pieces = {token_id: piece for piece, token_id in student_tokenizer.get_vocab().items()}
    teacher_pieces = {token_id: piece for piece, token_id in teacher_tokenizer.get_vocab().items()}
    ignored = set(ignore_ids)
    sizes = (
        f"; tokenizer sizes differ: student has {size} tokens, teacher has {teacher_size}"
        if size != teacher_size
        else ""
    )
    for token_id in sorted(student_pieces.keys() | teacher_pieces.keys()):
        if token_id in ignored:
            continue
        student_piece = student_pieces.get(token_id)
        teacher_piece = teacher_pieces.get(token_id)
        if student_piece != teacher_piece:
            missing = (
                " (None: the id is missing on that side)" if None in (student_piece, teacher_piece) else ""
            )
            raise VocabularyMismatchError(
                f"token id {token_id} differs: student {student_piece!r}, teacher {teacher_piece!r}{missing}"
                f"{sizes}. Distillation compares the two models id by id, so they must share one tokenizer "
                "vocabulary (models of one family)"
            )
    if size != teacher_size:
        raise VocabularyMismatchError(
            f"tokenizer sizes differ: student has {size} tokens, teacher has {teacher_size}"
        )

    for probe in probes:
        student_ids = student_tokenizer.encode(probe, add_special_tokens=False)
        teacher_ids = teacher_tokenizer.encode(probe, add_special_tokens=False)
        if student_ids == teacher_ids:
            continue
        at = _first_difference(student_ids, teacher_ids)
        raise VocabularyMismatchError(
            f"probe {probe!r} encodes differently from token {at} on: "
            f"student {_describe_token_at(student_tokenizer, student_ids, at)}, "
            f"teacher {_describe_token_at(teacher_tokenizer, teacher_ids, at)}"
        )
    return size


EMBEDDED_TOKENIZER = "embedded"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LoraSpec:
    """Low-rank adapters (LoRA, through peft) for a student too large to train in full.

    Only the adapters are trained: the optimizer sees the trainable parameters alone, so Adam's state
    and the gradients shrink to the adapters' size while the frozen base weights stay in `dtype`.

    Attributes:
        r: adapter rank.
        alpha: scaling numerator; the update is scaled by alpha / r.
        dropout: dropout on the adapter's input.
        target_modules: "all-linear" (every linear layer but the output layer) or a list of module names,
            e.g. [q_proj, k_proj, v_proj, o_proj].
        merge_on_save: save the adapter in `student/adapter/` and the base model with the adapter merged
            into `student/` (loadable by `AutoModelForCausalLM` alone); False saves the adapter only.
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] = "all-linear"
    merge_on_save: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"lora.r={self.r!r} must be a positive integer")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha={self.alpha!r} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout={self.dropout!r} must lie in [0, 1)")
        if not isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
            if not self.target_modules:
                raise ValueError("lora.target_modules is empty: name modules or use 'all-linear'")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from and how it is loaded: a local directory or hub id (`path`), or built.

    Attributes:
        path: a directory saved with `save_pretrained`, or a Hugging Face hub id; None builds a randomly
            initialised model with `build_causal_lm` from the remaining fields (tests, smoke runs).
        tokenizer: the tokenizer's directory or hub id; None = `path`; "embedded" = the project's
            character tokenizer (`eopd.tasks.tokenizer`), built offline.
        family, hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size, seed: for path=None.
        dtype: the weights' dtype ("float32", "bfloat16", "float16"); None = the pair's `dtype`.
        gradient_checkpointing: recompute each decoder layer in the backward pass instead of keeping its
            activations (student only): activation memory falls to about one layer's, for a second
            forward pass of compute.
        lora: LoRA adapters (a `LoraSpec` or its fields as a dict; student only; needs `pip install
            'eopd[lora]'`); None trains every weight.
        device_map: passed to `from_pretrained` (needs accelerate): "auto" spreads the layers over the
            visible GPUs and then the CPU, a dict places modules by name. Meant for the teacher; the
            module then leaves its placement alone. None loads on the CPU and Lightning moves the model.
        shard: the teacher under trainer=fsdp only: shard its decoder layers over the ranks like the
            student's (each GPU holds 1/N of it, gathered layer by layer to score); False replicates it.
        gguf: the model comes from a GGUF file (`eopd.conversion.GgufSource` or its fields), converted
            once into `path` (Hugging Face format) and loaded from there.
        init: the student is made from the checkpoint at `path` (usually the teacher's) by keeping some
            of its decoder layers (`eopd.pruning.StudentInit` or its fields: keep_layers or drop_layers).
    """

    path: str | None = None
    tokenizer: str | None = None
    family: str = "qwen3"
    hidden_size: int = 32
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None
    intermediate_size: int | None = None
    seed: int = 0
    dtype: str | None = None
    gradient_checkpointing: bool = False
    lora: LoraSpec | dict | None = None
    device_map: str | dict | None = None
    shard: bool = False
    gguf: GgufSource | dict | None = None
    init: StudentInit | dict | None = None

    def __post_init__(self) -> None:
        if isinstance(self.gguf, dict):
            object.__setattr__(self, "gguf", GgufSource(**self.gguf))
        if isinstance(self.init, dict):
            object.__setattr__(self, "init", StudentInit(**self.init))
        if (self.gguf is not None or self.init is not None) and self.path is None:
            raise ValueError("gguf and init need a path: where the model is converted to, or whose layers")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is unknown; allowed: {', '.join(DTYPES)}")
        if isinstance(self.lora, dict):
            object.__setattr__(self, "lora", LoraSpec(**self.lora))
        if self.lora is not None and importlib.util.find_spec("peft") is None:
            raise ValueError("lora needs the peft package: pip install 'eopd[lora]' (or pip install peft)")
        if self.device_map is not None:
            if self.init is not None:
                raise ValueError("device_map and init together: a pruned student is built on one device")
            if self.path is None:
                raise ValueError("device_map applies to a model loaded from path, not to a built one")
            if importlib.util.find_spec("accelerate") is None:
                raise ValueError("device_map needs the accelerate package: pip install accelerate")

    def check(self, key: str, *, converted: Collection[str] = ()) -> None:
        """Fail before anything loads when `path` is neither a local model directory nor a plausible hub id.

        A path in `converted` (or this source's own GGUF target) is written by a conversion before it
        loads; then the GGUF file must be found instead.
        """
        if self.gguf is not None:
            try:
                self.gguf.locate()
            except FileNotFoundError as error:
                raise ValueError(f"{key}.gguf: {error}") from None
            return
        if self.path in converted:
            return
        if self.path is None:
            if self.tokenizer is None:
                raise ValueError(
                    f"{key}.path is null, so {key}.tokenizer must name a tokenizer (e.g. 'embedded')"
                )
            return
        local = Path(self.path).expanduser()
        looks_local = self.path.startswith((".", "/", "~")) or local.exists() or self.path.count("/") != 1
        if looks_local:
            from eopd.model_files import check_model_directory

            check_model_directory(key, self.path, needs_tokenizer=self.tokenizer is None)
        if not looks_local and os.environ.get("HF_HUB_OFFLINE") == "1" and not _in_hub_cache(self.path):
            raise ValueError(
                f"{key}.path={self.path!r} is a hub id, but HF_HUB_OFFLINE=1 and it is not in the local cache: "
                "download it first (unset HF_HUB_OFFLINE with network access) or point to a local directory"
            )


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - any failure to look means "not cached"
        return False


def load_tokenizer(source: ModelSource, *, eos_token: str | None = None):
    """The tokenizer of a model source; `eos_token` picks the end token of the embedded tokenizer."""
    name = source.tokenizer or source.path
    if name == EMBEDDED_TOKENIZER:
        from eopd.tasks.tokenizer import END_OF_TEXT, build_tokenizer

        return build_tokenizer(eos_token=eos_token or END_OF_TEXT)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def load_model(
    source: ModelSource, *, vocab_size: int, dtype: str = "float32", special_ids: dict | None = None
):
    """Load (or build) a causal LM in `dtype`; a built model gets an output layer of `vocab_size` rows."""
    dtype = source.dtype or dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is unknown; allowed: {', '.join(DTYPES)}")
    if source.path is None:
        model = build_causal_lm(
            family=source.family,
            vocab_size=vocab_size,
            hidden_size=source.hidden_size,
            num_layers=source.num_layers,
            num_heads=source.num_heads,
            num_kv_heads=source.num_kv_heads,
            intermediate_size=source.intermediate_size,
            seed=source.seed,
            **(special_ids or {}),
        )
        return model.to(DTYPES[dtype])
    if source.init is not None:  # some layers of the checkpoint at path (a student made from its teacher)
        from eopd.pruning import load_pruned

        return load_pruned(source.path, source.init, dtype=DTYPES[dtype])
    from transformers import AutoModelForCausalLM

    placement = {} if source.device_map is None else {"device_map": source.device_map}
    return AutoModelForCausalLM.from_pretrained(source.path, dtype=DTYPES[dtype], **placement)


def prepare_student(model: PreTrainedModel, source: ModelSource):
    """Apply the source's training options to a loaded student: gradient checkpointing, LoRA adapters.

    Returns:
        The model to train: `model` itself, or a peft `PeftModel` around it when `source.lora` is set, in
        which only the adapters require gradients.
    """
    if source.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs (LoRA) and needs no enable_input_require_grads.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if source.lora is None:
        return model
    from peft import LoraConfig, get_peft_model

    spec = source.lora
    targets = spec.target_modules if isinstance(spec.target_modules, str) else list(spec.target_modules)
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def save_student(model, directory: Path | str, tokenizer=None, *, merge_lora: bool = True):
    """Save a trained student where `AutoModelForCausalLM.from_pretrained(directory)` loads it.

    A LoRA student saves its adapter in `directory/adapter/` (peft format) and, with `merge_lora`, the
    base model with the adapter merged into `directory/`. The merge happens in place: the returned model
    is then the merged plain model (use it from here on); otherwise `model` is returned.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    if not is_peft(model):
        model.save_pretrained(directory)
        return model
    model.save_pretrained(directory / "adapter")
    if tokenizer is not None:
        tokenizer.save_pretrained(directory / "adapter")
    if not merge_lora:
        return model
    merged = model.merge_and_unload()
    merged.save_pretrained(directory)
    return merged
