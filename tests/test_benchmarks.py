"""The six benchmarks: registry and local files, math-verify grading through evaluate, tables, the paper's rows."""

from __future__ import annotations

import random

import pytest
import torch

from eopd import evaluation as evaluate_module
from eopd.batch import RolloutBatch
from eopd.benchmarks import (
    BENCHMARKS,
    PAPER_PER_BENCHMARK,
    BenchmarkProtocol,
    benchmark_table,
    evaluate_benchmarks,
    format_benchmark_table,
    load_benchmarks,
    paper_comparison,
)
from eopd.data import PromptFormat
from eopd.evaluation import ModelSide
from eopd.models import build_causal_lm
from eopd.tasks.math_data import PAPER_SUFFIX, DataError
from eopd.tasks.tokenizer import build_tokenizer
from tests.conftest import write_jsonl


def test_the_registry_holds_the_paper_s_six_benchmarks():
    sizes = {name: b.size for name, b in BENCHMARKS.items()}

    assert sizes == {
        "math500": 500,
        "aime24": 30,
        "aime25": 30,
        "amc23": 40,
        "minerva": 272,
        "olympiadbench": 674,
    }
    assert BENCHMARKS["math500"].hub_id == "HuggingFaceH4/MATH-500"


def test_every_benchmark_loads_from_a_local_file_in_its_own_field_names(math_files):
    config = {name: {"path": str(path)} for name, path in math_files["benchmarks"].items()}

    records = load_benchmarks(config)

    assert list(records) == list(BENCHMARKS)
    for name, rows in records.items():
        assert len(rows) == 3, name
        assert all(r["prompt"].endswith(PAPER_SUFFIX) and r["prompt"].startswith("What is") for r in rows)
    assert records["amc23"][0]["answer"] == "263"  # the float 263.0, as text
    assert records["olympiadbench"][0]["answer"] == "$303$"  # a one-element list
    assert records["math500"][0]["answer"] == "203"


def test_benchmark_config_errors_name_the_key(math_files, tmp_path):
    with pytest.raises(DataError, match="unknown benchmark 'gsm8k'"):
        load_benchmarks({"gsm8k": {}})
    with pytest.raises(DataError, match=r"eval.benchmarks.aime24': unknown keys \['pth'\]"):
        load_benchmarks({"aime24": {"pth": "x"}})
    with pytest.raises(
        DataError, match=r"config 'eval.benchmarks.aime24.path'=.*missing.jsonl: no such file"
    ):
        load_benchmarks({"aime24": {"path": str(tmp_path / "missing.jsonl")}})
    # A file in another benchmark's layout: AMC23's rows have "question", AIME24 expects "problem".
    with pytest.raises(DataError, match=r"amc23.jsonl:1: missing field 'problem'"):
        load_benchmarks({"aime24": {"path": str(math_files["benchmarks"]["amc23"])}})
    # ... unless the fields are mapped.
    mapped = load_benchmarks(
        {"aime24": {"path": str(math_files["benchmarks"]["amc23"]), "prompt_field": "question"}}
    )
    assert len(mapped["aime24"]) == 3


def test_the_protocol_defaults_to_the_paper_s_evaluation():
    protocol = BenchmarkProtocol()

    spec = protocol.spec()
    assert (spec.n_samples, spec.temperature, spec.top_p, spec.max_new_tokens) == (8, 1.0, 0.8, 8192)
    assert protocol.models == ("after",)
    with pytest.raises(ValueError, match="models"):
        BenchmarkProtocol(models=("student",))
    with pytest.raises(ValueError, match="top_p"):
        BenchmarkProtocol(top_p=1.5)


# ---- evaluation through math-verify with a scripted policy ----------------------------------------------


def scripted_sampler(tokenizer, script):
    """A stand-in for `eopd.rollout.sample` that answers each prompt with the next scripted response."""
    served: dict[str, int] = {}

    def sample(model, prompts, *, max_new_tokens, eos_token_ids, pad_token_id, **kwargs):
        texts = []
        for ids in prompts:
            prompt = tokenizer.decode(ids)
            question = next(q for q in script if q in prompt)
            index = served.get(question, 0)
            served[question] = index + 1
            texts.append(script[question][index])
        responses = [tokenizer.encode(t, add_special_tokens=False) + [eos_token_ids[0]] for t in texts]
        width_p, width_r = max(map(len, prompts)), max(map(len, responses))
        rows, masks, response_masks = [], [], []
        for p, r in zip(prompts, responses, strict=True):
            rows.append([pad_token_id] * (width_p - len(p)) + p + r + [pad_token_id] * (width_r - len(r)))
            masks.append([0] * (width_p - len(p)) + [1] * (len(p) + len(r)) + [0] * (width_r - len(r)))
            response_masks.append([True] * len(r) + [False] * (width_r - len(r)))
        return RolloutBatch(
            input_ids=torch.tensor(rows),
            attention_mask=torch.tensor(masks),
            response_mask=torch.tensor(response_masks),
            prompt_length=width_p,
            truncated=torch.zeros(len(rows), dtype=torch.bool),
        )

    return sample


def test_benchmark_table_matches_a_direct_count_of_correct_samples(math_files, monkeypatch):
    config = {name: {"path": str(path)} for name, path in math_files["benchmarks"].items()}
    config["aime24"]["limit"] = 1  # unequal sizes: the mean over benchmarks is not the mean over problems
    records = load_benchmarks(config)
    n = 4
    rng = random.Random(0)
    script, correct = {}, {}
    for name, rows in records.items():
        correct[name] = []
        for record in rows:
            flags = [rng.random() < 0.4 for _ in range(n)]
            correct[name].append(flags)
            value = int(record["question"].split()[2]) * 2 + 3  # "What is a + (a+3)?"
            # Right answers in another form than the reference (math-verify must accept them), wrong ones off by one.
            script[record["question"]] = [
                f"It is \\boxed{{{value}.0}}." if ok else f"It is \\boxed{{{value + 1}}}." for ok in flags
            ]
    tokenizer = build_tokenizer()
    model = build_causal_lm(vocab_size=len(tokenizer), hidden_size=16, num_layers=1, num_heads=2, seed=0)
    side = ModelSide(model, tokenizer, PromptFormat(), (tokenizer.eos_token_id,))
    monkeypatch.setattr(evaluate_module, "sample", scripted_sampler(tokenizer, script))

    results = evaluate_benchmarks(
        side,
        records,
        BenchmarkProtocol(n_samples=n, max_new_tokens=32, batch_size=2),
        vocab_size=len(tokenizer),
    )
    table = benchmark_table({"student after": results}, n)["student after"]

    for name, flags in correct.items():
        assert table[f"{name}/avg@{n}"] == pytest.approx(sum(map(sum, flags)) / (len(flags) * n))
        assert table[f"{name}/pass@{n}"] == pytest.approx(sum(any(f) for f in flags) / len(flags))
    avg_direct = sum(sum(map(sum, f)) / (len(f) * n) for f in correct.values()) / len(correct)
    pass_direct = sum(sum(any(x) for x in f) / len(f) for f in correct.values()) / len(correct)
    assert table[f"mean/avg@{n}"] == pytest.approx(avg_direct)
    assert table[f"mean/pass@{n}"] == pytest.approx(pass_direct)
    assert 0 < avg_direct < 1  # the script has both right and wrong answers
    text = format_benchmark_table({"student after": results}, n)
    mean_row = text.splitlines()[-1].split()
    assert mean_row == ["mean", f"{avg_direct:.3f}", f"{pass_direct:.3f}"]
    assert "student after pass@4" in text.splitlines()[0]


def test_a_random_tiny_model_samples_and_is_graded_on_local_problems(tmp_path):
    path = write_jsonl(tmp_path / "aime.jsonl", [{"problem": "What is 1 + 2?", "answer": "3"}] * 2)
    records = load_benchmarks({"aime24": {"path": str(path)}})
    tokenizer = build_tokenizer()
    model = build_causal_lm(vocab_size=len(tokenizer), hidden_size=16, num_layers=1, num_heads=2, seed=0)
    side = ModelSide(model, tokenizer, PromptFormat(suffix="\n"), (tokenizer.eos_token_id,))

    results = evaluate_benchmarks(
        side, records, BenchmarkProtocol(n_samples=2, max_new_tokens=6), vocab_size=len(tokenizer)
    )

    assert results["aime24"]["avg@2"] == 0.0  # six random characters are never a boxed 3
    assert 0 < results["aime24"]["len_mean"] <= 6


# ---- the paper's numbers next to the run's ---------------------------------------------------------------


def test_paper_comparison_prints_the_paper_s_rows_and_the_run_s_numbers():
    measured = {"math500": {"avg@8": 0.5, "pass@8": 0.75}, "aime24": {"avg@8": 0.125, "pass@8": 0.25}}

    text = paper_comparison("qwen3_1.7b_base", "eopd", measured)

    lines = {line.split("  ")[0]: line for line in text.splitlines()}
    assert "67.76/84.80" in lines["paper OPD"] and "68.73/87.60" in lines["paper EOPD"]
    # The paper's six-benchmark means, from its printed numbers: their Pass@8 difference is the headline +2.39.
    opd = PAPER_PER_BENCHMARK["qwen3_1.7b_base"]["opd"].values()
    eopd = PAPER_PER_BENCHMARK["qwen3_1.7b_base"]["eopd"].values()
    gain = sum(p for _, p in eopd) / 6 - sum(p for _, p in opd) / 6
    assert gain == pytest.approx(2.39, abs=0.005)
    assert (
        lines["paper OPD"].split()[-1] == f"{sum(a for a, _ in opd) / 6:.2f}/{sum(p for _, p in opd) / 6:.2f}"
    )
    run = lines["this run (eopd)"].split()[3:]
    assert run[:2] == ["50.00/75.00", "12.50/25.00"]
    assert run[2:] == ["-"] * 5  # four benchmarks not measured, so no six-benchmark mean


def test_paper_comparison_for_a_student_without_per_benchmark_numbers():
    text = paper_comparison("qwen3_4b_base", "opd", {})

    assert "Qwen3-4B-Base" in text
    paper_row = next(line for line in text.splitlines() if line.startswith("paper OPD"))
    assert paper_row.split()[2:] == ["-"] * 7
    assert "+5.05 points" in text
    with pytest.raises(ValueError, match="unknown paper student"):
        paper_comparison("qwen3_14b", "opd", {})


def test_paper_comparison_for_the_appendix_llama_pair_names_its_teacher_and_has_no_paper_numbers():
    text = paper_comparison("llama3.2_3b_instruct", "eopd", {"math500": {"avg@8": 0.5, "pass@8": 0.75}})

    assert "Llama-3.2-3B-Instruct student, Llama-3.1-8B-Instruct teacher" in text
    run = next(line for line in text.splitlines() if line.startswith("this run"))
    assert run.split()[3] == "50.00/75.00"
    assert "no numbers for this pair" in text


def test_evaluate_command_line_on_benchmarks_from_local_files(math_files, tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    tokenizer = build_tokenizer()
    model = build_causal_lm(vocab_size=len(tokenizer), hidden_size=16, num_layers=1, num_heads=2, seed=0)
    model.save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "eopd.evaluate",
            f"checkpoint={tmp_path / 'student'}",
            f"+benchmarks.aime24.path={math_files['benchmarks']['aime24']}",
            f"+benchmarks.minerva.path={math_files['benchmarks']['minerva']}",
            "benchmark_protocol.n_samples=2",
            "benchmark_protocol.max_new_tokens=4",
            "paper_student=qwen3_1.7b_base",
            f"output={out}",
        ],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=180,
    )

    assert result.returncode == 0, result.stderr
    saved = json.loads(out.read_text())
    assert set(saved) == {"aime24", "minerva", "mean"}
    assert saved["mean"]["pass@2"] == pytest.approx(
        (saved["aime24"]["pass@2"] + saved["minerva"]["pass@2"]) / 2
    )
    assert "paper EOPD" in result.stdout and "minerva" in result.stdout
