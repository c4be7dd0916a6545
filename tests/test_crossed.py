"""Intervals over seeds and problems crossed: the components, the coverage they promise, Holm's
correction, and the verdicts `eopd.compare` writes from them."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from eopd.compare import write_report
from eopd.comparison import compare, mean_interval
from eopd.crossed import aligned_matrix, crossed_interval, variance_components
from eopd.t_distribution import t_two_sided_p
from eopd.verdicts import holm
from tests.test_compare import _with_problems


def _reference_components(x: np.ndarray) -> tuple[float, float, float]:
    """Float64, from the definitions: the expected mean squares of the two-way layout solved by hand."""
    s, p = x.shape
    grand = sum(sum(row) for row in x.tolist()) / (s * p)
    rows = [sum(row) / p for row in x.tolist()]
    cols = [sum(x[i, j] for i in range(s)) / s for j in range(p)]
    ms_rows = p * sum((r - grand) ** 2 for r in rows) / (s - 1)
    ms_cols = s * sum((c - grand) ** 2 for c in cols) / (p - 1)
    resid = sum((x[i, j] - rows[i] - cols[j] + grand) ** 2 for i in range(s) for j in range(p))
    ms_resid = resid / ((s - 1) * (p - 1))
    return max(0.0, (ms_rows - ms_resid) / p), max(0.0, (ms_cols - ms_resid) / s), ms_resid


def test_variance_components_match_their_definition_and_recover_an_additive_matrix():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 9)) + rng.normal(size=(4, 1)) + 2 * rng.normal(size=(1, 9))
    assert variance_components(x) == pytest.approx(_reference_components(x), rel=1e-12)

    seed_effect, problem_effect = rng.normal(size=(5, 1)), rng.normal(size=(1, 7))
    additive = seed_effect + problem_effect  # no interaction: the residual is exactly zero
    var_seed, var_problem, var_residual = variance_components(additive)
    assert var_residual == pytest.approx(0, abs=1e-24)
    assert var_seed == pytest.approx(np.var(seed_effect, ddof=1))
    assert var_problem == pytest.approx(np.var(problem_effect, ddof=1))


@pytest.mark.parametrize(
    "seed_sd, problem_sd, seed_t_at_most",
    [
        (0.03, 0.25, 0.8),
        (0.08, 0.02, 1.0),
    ],  # the problems dominate (a test set of varied difficulty); the seeds
)
def test_the_crossed_interval_covers_the_mean_of_new_seeds_and_new_problems(
    seed_sd, problem_sd, seed_t_at_most
):
    rng = np.random.default_rng(1)
    seeds, problems, trials = 5, 48, 600
    crossed_hits = seed_t_hits = 0
    for _ in range(trials):
        x = (
            0.5
            + seed_sd * rng.normal(size=(seeds, 1))
            + problem_sd * rng.normal(size=(1, problems))
            + 0.1 * rng.normal(size=(seeds, problems))
        )
        crossed = crossed_interval(x)
        crossed_hits += crossed.low <= 0.5 <= crossed.high
        seed_t = mean_interval(x.mean(axis=1))
        seed_t_hits += seed_t.low <= 0.5 <= seed_t.high
    assert 0.93 <= crossed_hits / trials <= 0.985  # near 95%: neither short nor needlessly wide
    assert seed_t_hits / trials <= seed_t_at_most  # where the problems dominate, their share is missing


def test_one_seed_gives_a_mean_without_an_interval_and_the_p_value_is_the_t_tests():
    lone = crossed_interval(np.array([[0.2, 0.4, 0.9]]))
    assert lone.mean == pytest.approx(0.5) and lone.half_width is None and lone.p_value is None
    assert lone.df is None

    x = np.array([[0.1, 0.3, 0.2, 0.4], [0.2, 0.5, 0.1, 0.6], [0.0, 0.4, 0.3, 0.3]])
    i = crossed_interval(x)
    assert i.p_value == pytest.approx(t_two_sided_p(i.mean / i.se, i.df)) and i.df >= 1
    assert t_two_sided_p(2.7764, 4) == pytest.approx(0.05, abs=1e-4)  # t_{0.975, 4} from tables


def test_holm_multiplies_the_ith_smallest_p_by_the_comparisons_left_and_stays_monotone():
    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.5})
    assert adjusted == pytest.approx({"a": 0.04, "c": 0.09, "b": 0.09, "d": 0.5})
    assert holm({"a": 0.6, "b": 0.7}) == {"a": 1.0, "b": 1.0}


def test_problems_are_aligned_by_id_and_seeds_on_other_problems_are_not_crossed():
    matrix = aligned_matrix(
        {0: (("p1", "p2"), np.array([1.0, 2.0])), 1: (("p2", "p1"), np.array([4.0, 3.0]))}
    )
    assert matrix.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert aligned_matrix({0: (("p1", "p2"), np.zeros(2)), 1: (("p1", "p3"), np.zeros(2))}) is None


def _study(shift: int, primary=("avg@4",), families=None):
    rng = np.random.default_rng(3)
    difficulty = rng.integers(0, 5, size=40)
    records = []
    for seed in range(4):
        for variant, delta in (("opd", 0), ("eopd", shift), ("tip", 0)):
            noise = rng.integers(-1, 2, size=40)
            record = _with_problems(variant, seed, np.clip(difficulty + noise + delta, 0, 4).tolist())
            record.config["study"] = {"primary": list(primary)} | ({"families": families} if families else {})
            records.append(record)
    return records


def test_the_report_gives_verdicts_from_the_crossed_interval_with_holm_across_the_declared_family(tmp_path):
    records = _study(shift=1)
    write_report(records, tmp_path, baseline="opd")
    report = (tmp_path / "report.md").read_text()

    verdicts = report.split("## Verdicts")[1].split("## Final metrics")[0]
    assert "One family of every variant" in verdicts
    eopd_row = next(line for line in verdicts.splitlines() if line.startswith("| all | eopd |"))
    tip_row = next(line for line in verdicts.splitlines() if line.startswith("| all | tip |"))
    assert eopd_row.endswith("| higher |") and "no difference shown" in tip_row

    crossed = compare(records, baseline="opd").crossed_difference
    p_holm = holm({v: crossed[v]["avg@4"].p_value for v in ("eopd", "tip")})
    assert f"| {p_holm['tip']:.2g} | no difference" in tip_row
    with open(tmp_path / "comparison.csv") as f:
        rows = {(r["variant"], r["metric"]): r for r in csv.DictReader(f)}
    assert float(rows["eopd", "avg@4"]["crossed_diff_p"]) == pytest.approx(crossed["eopd"]["avg@4"].p_value)
    assert float(rows["eopd", "avg@4"]["crossed_diff_mean"]) == pytest.approx(crossed["eopd"]["avg@4"].mean)


def test_families_declared_in_the_config_set_the_size_of_the_correction(tmp_path):
    records = _study(shift=1, primary=("avg@4", "pass@4"), families={"main": ["eopd"]})
    write_report(records, tmp_path, baseline="opd")
    verdicts = (tmp_path / "report.md").read_text().split("## Verdicts")[1].split("## Final metrics")[0]

    assert "`main`: 1 variants × 2 metrics" in verdicts and "| tip |" not in verdicts
    crossed = compare(records, baseline="opd").crossed_difference["eopd"]
    p_holm = holm({m: crossed[m].p_value for m in ("avg@4", "pass@4")})
    assert f"| `pass@4` | {crossed['pass@4'].mean:+.3f} |" in verdicts
    assert f"| {p_holm['pass@4']:.2g} |" in verdicts

    records = _study(shift=1, families={"main": ["eopd", "sead"]})  # sead did not run
    write_report(records, tmp_path / "partial", baseline="opd")
    verdicts = (tmp_path / "partial" / "report.md").read_text().split("## Verdicts")[1]
    assert "Declared in family `main` but without a crossed interval against `opd`" in verdicts
    assert "outside its correction: sead." in verdicts and "| main | eopd | `avg@4` |" in verdicts


def test_without_declared_primary_metrics_the_report_says_it_gives_no_verdicts(tmp_path):
    records = _study(shift=1, primary=())
    for record in records:
        del record.config["study"]
    write_report(records, tmp_path, baseline="opd")
    assert "No primary metrics were declared" in (tmp_path / "report.md").read_text()
