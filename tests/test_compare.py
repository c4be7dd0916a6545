"""eopd.compare: t intervals and paired differences, checked by hand and on the logs of real tiny runs."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import compose_train

import eopd.compare as compare_module
import eopd.train
from eopd.compare import CSV_COLUMNS, format_cell, main, table_metrics, write_report
from eopd.compare_plots import curve_band, curve_bin_steps
from eopd.comparison import (
    Interval,
    RunRecord,
    compare,
    config_value,
    find_runs,
    is_wandb_path,
    mean_interval,
    paired_difference,
    parse_history,
    read_run,
    record_from_wandb_run,
    variant_label,
)
from eopd.metrics import ProblemResults
from eopd.t_distribution import t_quantile

REPO = Path(eopd.train.CONF_DIR).parent
# Two-sided 95% t quantiles t_{0.975, df} from published tables.
T975 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 10: 2.2281, 30: 2.0423, 120: 1.9799}
T95 = {1: 6.3138, 2: 2.9200, 5: 2.0150, 30: 1.6973}


# ---- statistics on hand-made numbers ---------------------------------------------------------------------


@pytest.mark.parametrize(("p", "table"), [(0.975, T975), (0.95, T95)])
def test_t_quantile_matches_the_published_table(p, table):
    for df, expected in table.items():
        assert t_quantile(p, df) == pytest.approx(expected, abs=6e-5), f"df={df}"


def test_mean_interval_is_the_t_interval_with_n_minus_1_dof():
    interval = mean_interval([1.0, 2.0, 3.0, float("nan")])  # NaN: a seed that did not log it

    assert interval.n == 3
    assert interval.mean == pytest.approx(2.0)
    assert interval.std == pytest.approx(1.0)
    assert interval.half_width == pytest.approx(T975[2] / math.sqrt(3), rel=1e-4)
    assert (interval.low, interval.high) == pytest.approx((2 - interval.half_width, 2 + interval.half_width))
    assert mean_interval([1.0, 2.0, 3.0], confidence=0.90).half_width == pytest.approx(
        T95[2] / math.sqrt(3), rel=1e-4
    )


def test_one_seed_has_no_interval_and_says_so():
    interval = mean_interval([0.25])

    assert (interval.n, interval.mean, interval.half_width, interval.low) == (1, 0.25, None, None)
    assert format_cell(interval) == "0.250 (n=1)"
    assert format_cell(Interval(3, 0.5, 0.1, 0.25)) == "0.500 ± 0.250 (n=3)"


def test_paired_difference_pairs_by_seed_and_ignores_unpaired_seeds():
    variant = {0: 2.0, 1: 4.0, 2: 3.0, 3: 10.0}  # seed 3 has no baseline run
    baseline = {0: 1.0, 1: 2.0, 2: 3.0, 5: 0.0}  # seed 5 has no variant run

    diff = paired_difference(variant, baseline)

    # per-seed differences 1, 2, 0: mean 1, std 1
    assert diff.n == 3
    assert diff.mean == pytest.approx(1.0)
    assert diff.half_width == pytest.approx(T975[2] / math.sqrt(3), rel=1e-4)
    # an unpaired comparison would be far wider: the seeds' spread cancels in the pairs
    base = mean_interval(baseline[s] for s in (0, 1, 2))
    assert diff.half_width < base.half_width + mean_interval(variant[s] for s in (0, 1, 2)).half_width


def test_variant_label_reads_nested_and_flat_keys():
    config = {"objective": {"name": "eopd", "tau": 0.8, "alpha": 1.0}, "seed": 2}

    assert variant_label(config, ["objective.name"]) == "eopd"
    assert variant_label(config, ["objective.tau", "objective.alpha"]) == "tau=0.8,alpha=1.0"
    assert config_value({"objective/tau": 1.2}, "objective.tau") == 1.2  # as a flat wandb config
    with pytest.raises(KeyError, match="objective.beta"):
        variant_label(config, ["objective.beta"])


def test_compare_refuses_an_unknown_baseline_and_names_the_variants():
    records = [_record("opd", 0, 1.0), _record("eopd", 0, 2.0)]

    with pytest.raises(ValueError, match="eopd, opd"):
        compare(records, baseline="fkl")
    assert compare(records).baseline == "opd"  # the default when present


def _record(variant: str, seed: int, value: float) -> RunRecord:
    return RunRecord(
        name=f"{variant}-s{seed}",
        source=f"{variant}-s{seed}",
        config={"objective": {"name": variant}, "seed": seed},
        variant=variant,
        seed=seed,
        final={"pass@1": value},
        final_source="eval.json",
    )


def test_dense_curves_are_binned_per_run_before_the_interval_across_seeds():
    # 600 per-step points per run: each run is averaged within bins, then the band is across runs.
    runs = []
    for seed, offset in enumerate((0.0, 1.0, 2.0)):
        record = _record("eopd", seed, 0.5)
        record.curves["entropy/student"] = [(float(x), offset + x % 2) for x in range(1, 601)]
        runs.append(record)
    bin_steps = curve_bin_steps(runs, "entropy/student")
    band = curve_band(runs, "entropy/student", bin_steps=bin_steps)

    assert bin_steps == 10 and len(band) == 60
    x, interval = band[0]  # steps 1..10: per run the mean of 1,0,1,0,... is offset + 0.5
    assert x == 10 and interval.n == 3
    assert interval.mean == pytest.approx(statistics.fmean([0.5, 1.5, 2.5]))
    assert interval.low == pytest.approx(mean_interval([0.5, 1.5, 2.5]).low)
    assert curve_bin_steps(runs[:1], "val/avg@4") == 0  # sparse or absent curves are not binned


# ---- the bootstrap over problems within seeds, on hand-made per-problem results -------------------------


def _with_problems(variant: str, seed: int, correct, ids=None, n: int = 4) -> RunRecord:
    ids = tuple(ids) if ids is not None else tuple(f"test-{i:05d}" for i in range(len(correct)))
    problems = ProblemResults(ids=ids, n=n, correct=tuple(correct), paths=tuple(min(c, 1) for c in correct))
    record = _record(variant, seed, float("nan"))
    metrics = [f"avg@{n}", *(f"pass@{k}" for k in range(1, n + 1)), "paths/distinct"]
    record.final = {m: float(problems.per_problem(m).mean()) for m in metrics} | {f"maj@{n}": 0.5}
    record.problems = problems
    return record


def test_identical_variants_differ_by_exactly_zero_even_with_problems_listed_in_another_order():
    rng = np.random.default_rng(0)
    records = []
    for seed in range(3):
        correct = rng.integers(0, 5, size=20).tolist()
        base = _with_problems("opd", seed, correct)
        flipped = _with_problems("eopd", seed, correct[::-1], ids=base.problems.ids[::-1])
        records += [base, flipped]

    comparison = compare(records, baseline="opd")

    for metric in ("avg@4", "pass@1", "pass@2", "pass@4", "paths/distinct"):
        diff = comparison.bootstrap_difference["eopd"][metric]
        assert (diff.mean, diff.low, diff.high) == (0.0, 0.0, 0.0), metric
        assert diff.problems == (20, 20, 20)
        own, base = comparison.bootstrap["eopd"][metric], comparison.bootstrap["opd"][metric]
        assert own.mean == pytest.approx(base.mean, abs=1e-15) and own.low < own.high
    assert "maj@4" not in comparison.bootstrap["opd"]  # not determined by the per-problem counts


def test_a_variant_better_on_every_problem_has_a_difference_interval_above_zero():
    rng = np.random.default_rng(0)
    records = []
    for seed in range(3):
        baseline = rng.integers(0, 3, size=30)  # 0..2 of 4 correct
        better = baseline + rng.integers(1, 2, size=30, endpoint=True)  # 1 or 2 more, at most 4
        records += [
            _with_problems("opd", seed, baseline.tolist()),
            _with_problems("eopd", seed, better.tolist()),
        ]

    comparison = compare(records, baseline="opd")

    for metric in ("avg@4", "pass@1", "pass@2"):
        diff = comparison.bootstrap_difference["eopd"][metric]
        assert 0 < diff.low < diff.mean < diff.high, metric
    avg = comparison.bootstrap_difference["eopd"]["avg@4"]
    assert avg.mean == pytest.approx(comparison.difference["eopd"]["avg@4"].mean, abs=1e-15)


def test_runs_evaluated_on_different_problems_are_refused_with_both_runs_and_the_fix():
    base = _with_problems("opd", 0, [1, 2, 3])
    other = _with_problems("eopd", 0, [1, 2, 3], ids=["test-00000", "test-00001", "val-00007"])

    with pytest.raises(ValueError, match="different problems") as error:
        compare([base, other], baseline="opd")
    message = str(error.value)
    assert base.source in message and other.source in message
    assert "val-00007" in message and "test-00002" in message and "eval.final.n_problems" in message
    repeated = _with_problems("eopd", 0, [1, 2, 3], ids=["a", "a", "b"])
    with pytest.raises(ValueError, match="unique id"):
        compare([base, repeated], baseline="opd")


# ---- wandb: the parsing of history rows (the API itself needs a network) ----------------------------------


class FakeWandbRun:
    """What record_from_wandb_run reads from a wandb.apis.public.Run."""

    name = "eopd-s1"
    url = "https://wandb.ai/me/eopd/runs/abc"
    config = {"objective": {"name": "eopd"}, "seed": 1, "rollout_steps": 2, "total_optimizer_steps": 4}

    def scan_history(self):
        return [
            # a training row: Lightning's WandbLogger adds trainer/global_step; a histogram is a dict
            {"_step": 0, "_runtime": 3.0, "trainer/global_step": 0, "step/rollout": 1.0,
             "entropy/student": 2.0, "gate/fraction": 0.2, "entropy/histogram": {"_type": "histogram"}},
            # a validation row at the optimizer step that ends rollout step 1
            {"_step": 1, "trainer/global_step": 2, "val/avg@4": 0.25, "entropy/student": None},
            {"_step": 2, "trainer/global_step": 2, "step/rollout": 2.0, "entropy/student": 1.5,
             "gate/fraction": float("nan"), "samples": "table"},
            {"_step": 3, "trainer/global_step": 4, "val/avg@4": 0.5},
        ]  # fmt: skip


def test_wandb_history_rows_become_curves_on_the_rollout_step_axis():
    record = record_from_wandb_run(FakeWandbRun())

    assert (record.variant, record.seed, record.final_source) == ("eopd", 1, "wandb")
    assert record.curves["entropy/student"] == [(1.0, 2.0), (2.0, 1.5)]
    assert record.curves["val/avg@4"] == [(1.0, 0.25), (2.0, 0.5)]  # optimizer steps 2, 4 / 2 per rollout
    assert record.curves["gate/fraction"] == [(1.0, 0.2)]  # NaN skipped
    assert "entropy/histogram" not in record.curves and "samples" not in record.curves
    assert not any(k.startswith("_") for k in record.curves)
    assert record.final["val/avg@4"] == 0.5 and record.final["entropy/student"] == 1.5  # last values


def test_wandb_path_is_three_parts_that_are_not_a_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_wandb_path("me/eopd/gates")
    assert not is_wandb_path("eopd/gates")
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    assert not is_wandb_path("a/b/c")


# ---- the logs of real tiny runs: 2 objectives x 2 seeds ------------------------------------------------

OBJECTIVES = ("opd", "eopd")
SEEDS = (0, 1)
TINY = [
    "pair=tiny_random",
    "logger=csv",
    "rollout_steps=2",
    "data.batch_size=4",
    "update.mini_batch_size=2",
    "rollout.max_new_tokens=6",
    "data.n_train=16",
    "eval.n_problems=2",
    "eval.n_samples=2",
    "eval.every_n_rollout_steps=1",
    "eval.final.n_problems=2",
    "eval.final.n_samples=4",
    "log.samples_every=0",
    "log.histograms_every=0",
    "group=compare_test",
]


@pytest.fixture(scope="session")
def sweep_dir(tmp_path_factory) -> Path:
    """A sweep-like folder of four finished tiny runs (about 25 s on two cores)."""
    root = tmp_path_factory.mktemp("sweep")
    for job, (objective, seed) in enumerate((o, s) for o in OBJECTIVES for s in SEEDS):
        # Seed 1 keeps only the trained student's row, as `make demo` does (its runs share one pair).
        rows = ["eval.final.models=[after]"] if seed == 1 else []
        cfg = compose_train([f"objective={objective}", f"seed={seed}", *rows], base=TINY)
        eopd.train.run(cfg, root / f"{job}_{objective}-s{seed}")
    return root


def test_the_final_table_has_the_rows_eval_final_models_names(sweep_dir):
    for run in sweep_dir.iterdir():
        saved = json.loads((run / "eval.json").read_text())
        expected = (
            {"student after"} if run.name.endswith("-s1") else {"student before", "student after", "teacher"}
        )
        assert set(saved) == expected | {"problems"}, run.name
        assert set(saved["problems"]) == expected, run.name  # each row's per-problem results


@pytest.fixture(scope="session")
def report(sweep_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compare")
    assert main([str(sweep_dir), "--baseline", "opd", "--out", str(out)]) == 0
    return out


def _eval_after(sweep_dir: Path) -> dict[tuple[str, int], dict[str, float]]:
    values = {}
    for run in sweep_dir.iterdir():
        objective, seed = run.name.split("_", 1)[1].rsplit("-s", 1)
        values[objective, int(seed)] = json.loads((run / "eval.json").read_text())["student after"]
    return values


def _comparison_rows(out: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(out / "comparison.csv") as f:
        return {(row["variant"], row["metric"]): row for row in csv.DictReader(f)}


# metrics that differ between seeds on the tiny pair (its accuracies are all zero)
VARYING = ("entropy/student", "div/fkl_high_entropy", "pass@1")


def test_every_run_is_found_with_its_variant_seed_and_final_metrics(sweep_dir):
    records = [read_run(d) for d in find_runs(sweep_dir)]

    assert sorted((r.variant, r.seed) for r in records) == sorted((o, s) for o in OBJECTIVES for s in SEEDS)
    after = _eval_after(sweep_dir)
    for record in records:
        assert record.final_source == "eval.json"
        derived = {"entropy/high_frac_gap"}  # the student's fraction minus the teacher's, read off the row
        own = {k: v for k, v in record.final.items() if k not in derived}
        assert own == pytest.approx(after[record.variant, record.seed])


def test_table_means_and_intervals_equal_a_direct_computation(sweep_dir, report):
    after, rows = _eval_after(sweep_dir), _comparison_rows(report)

    assert any(statistics.stdev([after[o, s][m] for s in SEEDS]) > 0 for o in OBJECTIVES for m in VARYING)
    for objective in OBJECTIVES:
        for metric in VARYING:
            values = [after[objective, s][metric] for s in SEEDS]
            half = T975[1] * statistics.stdev(values) / math.sqrt(2)
            row = rows[objective, metric]
            assert int(row["n"]) == 2
            assert float(row["mean"]) == pytest.approx(statistics.fmean(values), abs=1e-12)
            assert float(row["ci_low"]) == pytest.approx(statistics.fmean(values) - half, rel=1e-4, abs=1e-12)
            assert float(row["ci_high"]) == pytest.approx(
                statistics.fmean(values) + half, rel=1e-4, abs=1e-12
            )


def test_paired_difference_is_the_mean_of_per_seed_differences(sweep_dir, report):
    after, rows = _eval_after(sweep_dir), _comparison_rows(report)

    for metric in VARYING:
        diffs = [after["eopd", s][metric] - after["opd", s][metric] for s in SEEDS]
        half = T975[1] * statistics.stdev(diffs) / math.sqrt(2)
        row = rows["eopd", metric]
        assert (row["baseline"], int(row["diff_n"])) == ("opd", 2)
        assert float(row["diff_mean"]) == pytest.approx(statistics.fmean(diffs), abs=1e-12)
        assert float(row["diff_ci_low"]) == pytest.approx(statistics.fmean(diffs) - half, rel=1e-4, abs=1e-12)
        assert float(row["diff_ci_high"]) == pytest.approx(
            statistics.fmean(diffs) + half, rel=1e-4, abs=1e-12
        )
        assert rows["opd", metric]["diff_mean"] == ""  # no difference of the baseline with itself


def test_per_problem_results_add_the_bootstrap_next_to_the_t_intervals(sweep_dir, report):
    rows, table = _comparison_rows(report), (report / "comparison.md").read_text()

    assert "Bootstrap over problems within seeds, 95%" in table
    assert "Paired difference against `opd`, bootstrap over problems within seeds, 95%" in table
    assert re.search(r"^\| eopd \| 2×2 \| [-+]?\d\.\d{3} \[", table, re.M), table
    for objective in OBJECTIVES:
        for metric in ("avg@4", "pass@1", "pass@4", "paths/distinct"):
            row = rows[objective, metric]
            assert (row["boot_seeds"], row["boot_problems"]) == ("2", "4"), metric  # 2 seeds x 2 problems
            # the estimate is the mean over seeds of each seed's eval.json value: the t interval's mean
            assert float(row["boot_mean"]) == pytest.approx(float(row["mean"]), abs=1e-12)
            assert float(row["boot_ci_low"]) <= float(row["boot_mean"]) <= float(row["boot_ci_high"])
            if objective == "eopd":
                assert float(row["boot_diff_mean"]) == pytest.approx(float(row["diff_mean"]), abs=1e-12)
        assert rows[objective, "entropy/student"]["boot_mean"] == ""  # not a mean over problems
    assert rows["opd", "avg@4"]["boot_diff_mean"] == ""  # no difference of the baseline with itself


def test_eval_json_without_per_problem_results_compares_exactly_as_before(sweep_dir, report, tmp_path):
    old = tmp_path / "old"
    for run in sweep_dir.iterdir():
        shutil.copytree(run, old / run.name, ignore=shutil.ignore_patterns("student", "checkpoints"))
        saved = json.loads((old / run.name / "eval.json").read_text())
        del saved["problems"]  # as eval.json was written before per-problem results
        (old / run.name / "eval.json").write_text(json.dumps(saved))
    out = tmp_path / "compare"

    assert main([str(old), "--baseline", "opd", "--out", str(out)]) == 0

    with open(out / "comparison.csv") as f:
        assert tuple(next(csv.reader(f))) == CSV_COLUMNS
    with_problems = _comparison_rows(report)
    assert _comparison_rows(out) == {
        key: {column: row[column] for column in CSV_COLUMNS} for key, row in with_problems.items()
    }
    table = (report / "comparison.md").read_text()
    over_seeds = table[table.index("Over seed means") :].split("\n\nBootstrap over problems")[0]
    assert (out / "comparison.md").read_text() == over_seeds + "\n"  # no crossed or bootstrap tables
    assert all(read_run(run).problems is None for run in old.iterdir())


def test_markdown_table_shows_every_variant_with_its_seeds(report):
    table = (report / "comparison.md").read_text()

    for objective in OBJECTIVES:
        assert re.search(rf"^\| {objective} \| 0,1 \|.*± .*\(n=2\)", table, re.M), table
    assert "Paired difference against `opd`" in table


def test_plots_exist_and_the_report_embeds_them_with_the_table_and_command(report):
    text = (report / "report.md").read_text()

    images = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text)
    expected = {"student_entropy.png", "fkl_high_entropy.png", "gate_fraction.png", "val_avg_at_k.png"}
    expected |= {"high_entropy_gap.png"}  # the student's high-entropy fraction against the teacher's
    assert expected | {"pass_at_k.png"} <= set(images)
    for name in images:
        png = (report / name).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 1000, name
    assert (report / "comparison.md").read_text().strip() in text
    assert "python -m eopd.compare " in text and "--baseline opd" in text
    from eopd.provenance import code_version

    head = code_version()["commit"]
    if head is not None:  # a git checkout, as in CI: every run recorded the commit it ran at
        assert f"Code: commit {head[:12]}" in text


def test_training_and_validation_curves_share_the_rollout_step_axis(sweep_dir):
    records = [read_run(d) for d in find_runs(sweep_dir) if "_eopd-" in d.name]
    by_step: dict[float, list[float]] = {}
    for run in sweep_dir.glob("*_eopd-*"):
        with open(run / "metrics.csv") as f:
            for row in csv.DictReader(f):
                if row["entropy/student"]:
                    by_step.setdefault(float(row["step/rollout"]), []).append(float(row["entropy/student"]))

    entropy = curve_band(records, "entropy/student")
    val_avg = curve_band(records, "val/avg@2")

    assert [x for x, _ in entropy] == [1.0, 2.0] == sorted(by_step)
    for x, interval in entropy:
        assert interval.n == 2
        assert interval.mean == pytest.approx(statistics.fmean(by_step[x]))
    # validation is logged at optimizer steps 2 and 4 (two per rollout step): the same rollout steps 1, 2
    assert [x for x, _ in val_avg] == [1.0, 2.0]


def test_one_seed_per_variant_reports_n1_without_an_interval(sweep_dir, tmp_path):
    runs = [str(d) for d in find_runs(sweep_dir) if d.name.endswith("-s0")]

    assert main([*runs, "--out", str(tmp_path)]) == 0

    markdown = (tmp_path / "comparison.md").read_text()
    t_tables = markdown[markdown.index("Over seed means") :].split("\n\nBootstrap over problems")[0]
    rows_md = [line for line in t_tables.splitlines() if "opd |" in line]
    assert len(rows_md) == 3  # opd, eopd, and eopd - opd
    assert all("(n=1)" in line and "±" not in line for line in rows_md)
    rows = _comparison_rows(tmp_path)
    assert rows["eopd", "pass@1"]["ci_low"] == "" and rows["eopd", "pass@1"]["diff_ci_low"] == ""
    assert rows["eopd", "pass@1"]["n"] == "1"


def test_the_high_entropy_gap_is_the_students_fraction_minus_the_teachers_on_the_same_rows():
    rows = [
        {"step": 1, "step/rollout": 1, "entropy/student_high_frac": 0.2, "entropy/teacher_high_frac": 0.15},
        {"step": 2, "val/entropy/student_high_frac": 0.05, "val/entropy/teacher_high_frac": 0.15},
        {"step": 3, "step/rollout": 2, "entropy/student_high_frac": 0.1},  # no teacher: no gap
    ]
    curves, _ = parse_history(rows, step_key="step", steps_per_rollout=1)
    assert curves["entropy/high_frac_gap"] == [(1, pytest.approx(0.05))]
    assert curves["val/entropy/high_frac_gap"] == [(2, pytest.approx(-0.1))]


def test_the_final_high_entropy_gap_comes_from_the_trained_students_row(sweep_dir):
    record = read_run(next(sweep_dir.glob("*_eopd-s0")))
    gap = record.final["entropy/student_high_frac"] - record.final["entropy/teacher_high_frac"]
    assert record.final["entropy/high_frac_gap"] == pytest.approx(gap)


def test_a_run_without_eval_json_falls_back_to_its_last_logged_values(sweep_dir, tmp_path):
    source = next(sweep_dir.glob("*_opd-s0"))
    run = tmp_path / source.name
    shutil.copytree(source, run, ignore=shutil.ignore_patterns("student", "checkpoints", "eval.json"))
    with open(run / "metrics.csv") as f:
        last_val = [row["val/avg@2"] for row in csv.DictReader(f) if row["val/avg@2"]][-1]

    record = read_run(run)

    assert record.final_source == "metrics.csv"
    assert record.final["val/avg@2"] == float(last_val)


def test_two_runs_of_one_variant_and_seed_are_refused_with_the_keys_that_differ(sweep_dir, tmp_path, capsys):
    assert main([str(sweep_dir), "--by", "group", "--out", str(tmp_path)]) == 2

    error = capsys.readouterr().err
    assert "with seed" in error and "objective.name" in error


def test_cli_writes_next_to_the_sweep_by_default(sweep_dir, tmp_path):
    sweep = tmp_path / "sweep"
    for run in sweep_dir.iterdir():
        shutil.copytree(run, sweep / run.name, ignore=shutil.ignore_patterns("student", "checkpoints"))

    result = subprocess.run(
        [sys.executable, "-m", "eopd.compare", str(sweep), "--baseline", "eopd"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr
    assert "Paired difference against `eopd`" in result.stdout
    assert (sweep / "compare" / "report.md").is_file()
    missing = subprocess.run(
        [sys.executable, "-m", "eopd.compare", str(tmp_path / "nowhere")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and "nowhere" in missing.stderr


def test_math_benchmark_results_become_final_metrics_and_their_mean_a_table_column(sweep_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(next(find_runs(sweep_dir).__iter__()), run)
    saved = json.loads((run / "eval.json").read_text())
    saved["benchmarks"] = {
        "student after": {
            "math500": {"avg@8": 0.5, "pass@8": 0.75, "n_problems": 4},
            "aime24": {"avg@8": 0.25, "pass@8": 0.5, "n_problems": 2},
            "mean": {"avg@8": 0.375, "pass@8": 0.625},
        }
    }
    (run / "eval.json").write_text(json.dumps(saved))

    record = read_run(run)

    assert record.final["bench/math500/avg@8"] == 0.5
    assert record.final["bench/mean/pass@8"] == 0.625
    assert record.final["avg@4"] == saved["student after"]["avg@4"]  # the embedded table is kept
    shown = table_metrics([record])
    assert {"bench/mean/avg@8", "bench/mean/pass@8"} <= set(shown)
    assert "bench/math500/avg@8" not in shown


def test_primary_metrics_fixed_in_the_sweep_config_lead_the_report_and_a_second_baseline_gets_its_tables(
    tmp_path,
):
    rng = np.random.default_rng(1)
    records = []
    for seed in range(3):
        for variant, shift in (("opd", 0), ("eopd", 1), ("tip", 2)):
            correct = np.clip(rng.integers(0, 4, size=12) + shift, 0, 4).tolist()
            record = _with_problems(variant, seed, correct)
            record.config["study"] = {"primary": ["pass@4", "paths/distinct"]}
            records.append(record)

    write_report(records, tmp_path, baseline="opd", also_against=["eopd"])
    report = (tmp_path / "report.md").read_text()

    assert (
        "Primary metrics, fixed in the sweep's config (`study.primary`) before the runs: `pass@4`" in report
    )
    first_table_header = next(line for line in report.splitlines() if line.startswith("| variant | seeds |"))
    assert first_table_header.startswith("| variant | seeds | `pass@4` | `paths/distinct` |")
    against = report.split("## Against `eopd`")[1]
    assert "Paired difference against `eopd`" in against and "| tip |" in against
    expected = compare(records, baseline="eopd").difference["tip"]["pass@4"].mean
    with open(tmp_path / "comparison_vs_eopd.csv") as handle:
        rows = {r["variant"]: r for r in csv.DictReader(handle) if r["metric"] == "pass@4"}
    assert float(rows["tip"]["diff_mean"]) == pytest.approx(expected)


def test_a_sweep_folder_gives_the_report_its_command_and_wall_time(tmp_path):
    (tmp_path / "multirun.yaml").write_text(
        "hydra:\n  overrides:\n    hydra: [hydra/launcher=parallel]\n    task: [sweep=study, seed=0]\n"
    )
    records = []
    for i, (start, end) in enumerate(((1000.0, 1300.0), (1010.0, 1600.0))):
        run = tmp_path / f"{i}_opd-s{i}"
        (run / ".hydra").mkdir(parents=True)
        (run / "finished.json").write_text("{}")
        os.utime(run / ".hydra", (start, start))
        os.utime(run / "finished.json", (end, end))
        record = _record("opd", i, 0.5)
        record.source = str(run)
        records.append(record)

    text = compare_module.sweep_provenance(records)

    assert text == (
        "Sweep: `python -m eopd.train sweep=study seed=0 hydra/launcher=parallel` (2 runs). "
        "Wall time 10.0 min, from its first run's start to its last run's end."
    )
    records[1].source = str(tmp_path / "elsewhere" / "run")  # not in a sweep folder: left out
    assert "(1 run). Wall time 5.0 min" in compare_module.sweep_provenance(records)
    records[0].source = str(tmp_path / "elsewhere" / "other")
    assert compare_module.sweep_provenance(records) == ""


def test_the_comparison_shows_the_final_tables_metrics_in_its_order():
    from eopd.metrics import final_table_keys

    keys = final_table_keys(8, {"forks/kl"})
    assert keys[:4] == ["avg@8", "pass@1", "pass@8", "maj@8"]
    assert "forks/kl" in keys and "paths/even_spread" not in keys  # task-specific: only when measured
    record = _record("eopd", 0, 0.5)
    record.final = dict.fromkeys([*reversed(keys), "pass@2", "pass@4", "gate/fraction"], 0.5)
    assert table_metrics([record]) == keys  # pass@1 and the largest k only; unlisted metrics in the CSV
