"""What a local model directory must hold before anything loads from it: weight files, and a tokenizer
unless another source names one (`eopd.models.ModelSource.check`)."""

from __future__ import annotations

from pathlib import Path

WEIGHT_FILES = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_model_files(key: str, directory: Path, *, needs_tokenizer: bool) -> None:
    """A local model directory holds weights, and a tokenizer unless another source gives one."""
    if not any(any(directory.glob(pattern)) for pattern in WEIGHT_FILES):
        raise ValueError(
            f"{key}.path={str(directory)!r} has config.json but no weight files ({', '.join(WEIGHT_FILES)}): "
            "it was not saved with save_pretrained, or the copy is incomplete; save or copy the model again"
        )
    if needs_tokenizer and not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(
            f"{key}.path={str(directory)!r} has no tokenizer ({', '.join(TOKENIZER_FILES)}): save the "
            f"tokenizer beside the model (tokenizer.save_pretrained) or name one with {key}.tokenizer"
        )


def check_model_directory(key: str, path: str, *, needs_tokenizer: bool) -> None:
    """Raise a ValueError naming `key` unless `path` is a directory that save_pretrained wrote."""
    local = Path(path).expanduser()
    if local.is_file():
        raise ValueError(
            f"{key}.path={path!r} is a file, not a model directory: give the directory that save_pretrained "
            "wrote (config.json, the weights and the tokenizer)"
            + (f"; for a GGUF file use {key}.gguf" if local.suffix == ".gguf" else "")
        )
    if not (local / "config.json").is_file():
        raise ValueError(
            f"{key}.path={path!r}: no model there (expected a directory with config.json, saved by "
            "save_pretrained). Fix the path, or give a hub id such as Qwen/Qwen3-1.7B-Base"
        )
    check_model_files(key, local, needs_tokenizer=needs_tokenizer)
