"""The paper's six math benchmarks: their sources, the evaluation protocol, tables, the section-4 numbers.

    records = load_benchmarks({"math500": {}, "aime24": {"path": "aime24.jsonl"}})
    results = evaluate_benchmarks(student_side, records, BenchmarkProtocol(), vocab_size=vocab)
    print(format_benchmark_table({"student after": results}, 8))
    print(paper_comparison("qwen3_1.7b_base", "eopd", results, 8))

Each benchmark is read from the hub with `datasets` when reachable, or from a local JSONL or Parquet file
(`eval.benchmarks.<name>.path=...`), with the same row checks as the training data
(`eopd.tasks.math_data`). Grading is math-verify on the last `\\boxed{}` (`eopd.evaluation.MathGrader`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from eopd.evaluation import EvalSpec, MathGrader, evaluate, format_table
from eopd.tasks.math_data import PAPER_SUFFIX, DataError, MathSource, load_math_records


@dataclass(frozen=True)
class Benchmark:
    """One benchmark's default source and how to read it.

    Attributes:
        title: the name the paper prints.
        hub_id, hub_config, split: the `datasets` hub dataset read by default.
        prompt_field, answer_field: the fields holding the problem and the reference answer.
        size: the number of problems the paper evaluates (PAPER.md section 4).
    """

    title: str
    hub_id: str
    split: str
    prompt_field: str
    answer_field: str
    size: int
    hub_config: str | None = None


# Hub ids: the copies commonly used for these benchmarks in math RL and distillation evaluations. UNVERIFIED
# by download: the machine this was written on has no hub access, so ids, splits and field names come from
# public evaluation code that loads these datasets, and sizes are the paper's. The paper does not name the
# copies it used. Override any field with eval.benchmarks.<name>.<field>=... or use a local file (path).
BENCHMARKS: dict[str, Benchmark] = {
    "math500": Benchmark("MATH500", "HuggingFaceH4/MATH-500", "test", "problem", "answer", 500),
    "aime24": Benchmark("AIME24", "HuggingFaceH4/aime_2024", "train", "problem", "answer", 30),
    "aime25": Benchmark("AIME25", "math-ai/aime25", "test", "problem", "answer", 30),
    "amc23": Benchmark("AMC23", "math-ai/amc23", "test", "question", "answer", 40),
    "minerva": Benchmark("Minerva", "math-ai/minervamath", "test", "question", "answer", 272),
    # final_answer is a list (several answers for some problems); they are joined with ", ".
    "olympiadbench": Benchmark(
        "OlympiadBench", "math-ai/olympiadbench", "test", "question", "final_answer", 674
    ),
}

# What a config entry eval.benchmarks.<name> may set; path wins over the hub fields.
OVERRIDE_KEYS = (
    "path", "hub_id", "hub_config", "split", "prompt_field", "answer_field", "id_field", "limit",
)  # fmt: skip
MODELS = ("before", "after", "teacher")


@dataclass(frozen=True)
class BenchmarkProtocol:
    """How the benchmarks are evaluated: the paper's protocol by default, separate from training sampling.

    Attributes:
        models: which models to evaluate: "before" (the student before training), "after" (the trained
            student), "teacher".
        suffix: appended to every problem (the paper's instruction, as in training).
        n_samples: samples per problem (Avg@n, Pass@n); the paper: 8.
        temperature, top_p: sampling; the paper: 1.0 and 0.8.
        max_new_tokens: response length limit; the paper: 8192.
        batch_size: problems per sampling batch (each repeated n_samples times).
        seed: sampling seed.
    """

    models: tuple[str, ...] = ("after",)
    suffix: str = PAPER_SUFFIX
    n_samples: int = 8
    temperature: float = 1.0
    top_p: float = 0.8
    max_new_tokens: int = 8192
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", tuple(self.models))
        unknown = [m for m in self.models if m not in MODELS]
        if unknown or not self.models:
            raise ValueError(
                f"eval.benchmark_protocol.models={list(self.models)} must name some of {', '.join(MODELS)}"
            )
        self.spec()  # checks the sampling values

    def spec(self):
        """The sampling settings as an `eopd.evaluation.EvalSpec`."""
        return EvalSpec(
            n_samples=self.n_samples,
            temperature=self.temperature,
            top_p=self.top_p,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            seed=self.seed,
        )


def benchmark_source(
    name: str, overrides: Mapping[str, Any] | None = None, *, suffix: str = PAPER_SUFFIX
) -> MathSource:
    """The `MathSource` of a registered benchmark, with a config entry's overrides applied.

    Raises:
        DataError: the name is not registered or an override key is unknown.
    """
    key = f"eval.benchmarks.{name}"
    if name not in BENCHMARKS:
        raise DataError(f"config '{key}': unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(OVERRIDE_KEYS))
    if unknown:
        raise DataError(f"config '{key}': unknown keys {unknown}; allowed: {', '.join(OVERRIDE_KEYS)}")
    default = BENCHMARKS[name]
    fields: dict[str, Any] = {
        "hub_id": default.hub_id,
        "hub_config": default.hub_config,
        "split": default.split,
        "prompt_field": default.prompt_field,
        "answer_field": default.answer_field,
    }
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return MathSource(**fields, suffix=suffix, key=key)


def load_benchmarks(
    config: Mapping[str, Mapping[str, Any] | None], *, suffix: str = PAPER_SUFFIX
) -> dict[str, list[dict[str, Any]]]:
    """Records of every benchmark named in `config` (name -> overrides), in the registry's order.

    Raises:
        DataError: see `benchmark_source` and `eopd.tasks.math_data.load_math_records`.
    """
    unknown = [name for name in config if name not in BENCHMARKS]
    if unknown:
        raise DataError(
            f"config 'eval.benchmarks': unknown benchmark {unknown[0]!r}; known: {', '.join(BENCHMARKS)}"
        )
    return {
        name: load_math_records(benchmark_source(name, config[name], suffix=suffix))
        for name in BENCHMARKS
        if name in config
    }


def evaluate_benchmarks(
    side, benchmarks: Mapping[str, Sequence[dict[str, Any]]], protocol: BenchmarkProtocol, *, vocab_size: int
) -> dict[str, dict[str, float]]:
    """`eopd.evaluation.evaluate` on every benchmark with the math-verify grader; benchmark -> metrics.

    Args:
        side: the model evaluated (`eopd.evaluation.ModelSide`).
        benchmarks: benchmark name -> records, as `load_benchmarks` returns them.
        protocol: the sampling settings.
        vocab_size: the vocabulary sampled from (padded output rows excluded).
    """
    spec = protocol.spec()
    return {
        name: evaluate(side, records, MathGrader(), spec, vocab_size=vocab_size).metrics
        for name, records in benchmarks.items()
    }


def benchmark_table(
    runs: Mapping[str, Mapping[str, Mapping[str, float]]], n: int
) -> dict[str, dict[str, float]]:
    """Flatten {model: {benchmark: metrics}} into {model: {"<benchmark>/avg@n": ..., "mean/pass@n": ...}}.

    The mean is the unweighted mean over the benchmarks (the paper averages its six benchmarks, not their
    problems).
    """
    table = {}
    for model, results in runs.items():
        row = {}
        for metric in (f"avg@{n}", f"pass@{n}"):
            for name, metrics in results.items():
                row[f"{name}/{metric}"] = metrics[metric]
            if results:
                row[f"mean/{metric}"] = sum(m[metric] for m in results.values()) / len(results)
        table[model] = row
    return table


def format_benchmark_table(runs: Mapping[str, Mapping[str, Mapping[str, float]]], n: int) -> str:
    """A plain-text table: one row per benchmark and the mean, Avg@n and Pass@n columns for each model."""
    table = benchmark_table(runs, n)
    names = [*next(iter(runs.values())), "mean"] if runs else []
    keys = [f"{model} {metric}@{n}" for model in runs for metric in ("avg", "pass")]
    rows = {
        name: {
            f"{model} {metric}@{n}": table[model][f"{name}/{metric}@{n}"]
            for model in runs
            for metric in ("avg", "pass")
        }
        for name in names
    }
    return format_table(rows, keys)


# ---- the paper's numbers (PAPER.md section 4) ---------------------------------------------------------

# Avg@8 / Pass@8 in percent, as printed. Only the 1.7B student has per-benchmark numbers in PAPER.md.
PAPER_PER_BENCHMARK: dict[str, dict[str, dict[str, tuple[float, float]]]] = {
    "qwen3_1.7b_base": {
        "opd": {
            "math500": (67.76, 84.80),
            "aime24": (8.33, 20.00),
            "aime25": (6.25, 16.67),
            "amc23": (39.06, 70.00),
            "minerva": (29.83, 47.06),
            "olympiadbench": (30.09, 51.56),
        },
        "eopd": {
            "math500": (68.73, 87.60),
            "aime24": (10.42, 23.33),
            "aime25": (5.83, 16.67),
            "amc23": (41.88, 75.00),
            "minerva": (30.15, 50.74),
            "olympiadbench": (30.28, 51.11),
        },
    },
}
# EOPD minus OPD, six-benchmark mean Pass@8, in points: the paper's headline numbers.
PAPER_PASS_GAIN: dict[str, float] = {"qwen3_0.6b_base": 1.37, "qwen3_1.7b_base": 2.39, "qwen3_4b_base": 5.05}
PAPER_STUDENTS = {
    "qwen3_0.6b_base": "Qwen3-0.6B-Base",
    "qwen3_1.7b_base": "Qwen3-1.7B-Base",
    "qwen3_4b_base": "Qwen3-4B-Base",
    "llama3.2_3b_instruct": "Llama-3.2-3B-Instruct",  # the appendix pair: no numbers in PAPER.md
}


def _paper_teacher(student: str) -> str:
    return "Llama-3.1-8B-Instruct" if student.startswith("llama") else "Qwen3-8B"


def paper_comparison(
    student: str, objective: str, measured: Mapping[str, Mapping[str, float]], n: int = 8
) -> str:
    """The paper's section-4 rows for `student` next to this run's numbers, Avg@n / Pass@n in percent.

    Args:
        student: a key of `PAPER_STUDENTS` ("qwen3_1.7b_base").
        objective: the run's objective name, shown in its row label.
        measured: this run's benchmark -> metrics (fractions, as `evaluate_benchmarks` returns them).
        n: the run's samples per problem; the paper's are 8.

    Returns:
        A plain-text table: "paper OPD" and "paper EOPD" (their six-benchmark mean computed from the printed
        numbers), then "this run"; "-" wherever a number is not in PAPER.md or was not measured. The run's
        mean is shown only when all six benchmarks were measured.
    """
    if student not in PAPER_STUDENTS:
        raise ValueError(f"unknown paper student {student!r}; known: {', '.join(PAPER_STUDENTS)}")
    names = list(BENCHMARKS)
    rows: dict[str, list[tuple[float, float] | None]] = {}
    for method in ("opd", "eopd"):
        printed = PAPER_PER_BENCHMARK.get(student, {}).get(method, {})
        cells = [printed.get(name) for name in names]
        rows[f"paper {method.upper()}"] = [*cells, _mean(cells)]
    ours = [
        (100 * measured[name][f"avg@{n}"], 100 * measured[name][f"pass@{n}"]) if name in measured else None
        for name in names
    ]
    rows[f"this run ({objective})"] = [*ours, _mean(ours)]

    headers = [BENCHMARKS[name].title for name in names] + ["mean"]
    label_width = max(len(label) for label in rows) + 2
    width = max(13, *(len(h) for h in headers)) + 2
    lines = [
        f"Avg@k / Pass@k in %, {PAPER_STUDENTS[student]} student, {_paper_teacher(student)} teacher: "
        f"the paper (PAPER.md section 4, k = 8) and this run (k = {n})",
        " " * label_width + "".join(f"{h:>{width}}" for h in headers),
    ]
    for label, cells in rows.items():
        text = "".join(f"{'-' if c is None else f'{c[0]:.2f}/{c[1]:.2f}':>{width}}" for c in cells)
        lines.append(f"{label:<{label_width}}{text}")
    if student in PAPER_PASS_GAIN:
        lines.append(f"paper: EOPD - OPD, six-benchmark mean Pass@8: +{PAPER_PASS_GAIN[student]:.2f} points")
    else:
        lines.append("paper: no numbers for this pair in PAPER.md")
    if n != 8:
        lines.append(
            f"note: this run drew {n} samples per problem, the paper 8: the numbers are not comparable"
        )
    return "\n".join(lines)


def _mean(cells: Sequence[tuple[float, float] | None]) -> tuple[float, float] | None:
    if not cells or any(c is None for c in cells):
        return None
    return (sum(c[0] for c in cells) / len(cells), sum(c[1] for c in cells) / len(cells))  # type: ignore[index]
