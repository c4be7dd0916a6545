"""Intervals over training seeds and test problems crossed (the verdicts that use them: `eopd.verdicts`).

Every seed of a sweep is evaluated on the same test problems, so a per-problem value (or a per-problem
difference against a baseline) forms a seeds x problems matrix x[s, p]. Read it as the two-way model

    x[s, p] = mu + a[s] + b[p] + e[s, p]

with independent seed effects a (variance var_seed), problem effects b (var_problem) and an interaction
e (var_residual). The estimate is the grand mean; a new study draws new seeds *and* new problems, so its
variance is

    var_seed / S + var_problem / P + var_residual / (S P).

The t interval over seed means leaves out var_problem / P (every seed saw the same problems, so b cancels
between seeds); the bootstrap over problems within fixed seeds leaves out var_seed / S. Both understate.

The components come from the two-way analysis of variance without replication (mean squares of the rows,
the columns and the residual, each with its expectation solved for its component, negative estimates
floored at zero). The interval is a t interval with Satterthwaite's degrees of freedom for that sum of
mean squares (rounded down): about S - 1 when the seeds dominate, more when the problems do; in the
tests' simulations it covers the mean of new seeds and problems at 95-98% in both regimes, where the t
over seed means covers 70%. One seed (or one problem) gives the mean alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from eopd.bootstrap import matching_problems
from eopd.markdown import fmt_number, markdown_table
from eopd.t_distribution import SymmetricBounds, t_quantile, t_two_sided_p


@dataclass(frozen=True)
class CrossedInterval(SymmetricBounds):
    """The grand mean of a seeds x problems matrix and its crossed standard error.

    Attributes:
        seeds, problems: the matrix's shape.
        mean: the grand mean.
        se: the standard error from the three variance components (None with one seed).
        half_width: the t half-width at the requested confidence, `df` degrees of freedom.
        p_value: two-sided p of the mean against 0 (meaningful for a difference).
        df: Satterthwaite's degrees of freedom, rounded down.
        var_seed, var_problem, var_residual: the estimated components (floored at 0).
    """

    seeds: int
    problems: int
    mean: float
    se: float | None
    half_width: float | None
    p_value: float | None
    df: int | None
    var_seed: float
    var_problem: float
    var_residual: float


def _mean_squares(x: np.ndarray) -> tuple[float, float, float]:
    """(MS_seeds, MS_problems, MS_residual) of a (seeds, problems) matrix with at least 2 of each."""
    seeds, problems = x.shape
    grand = x.mean()
    row = x.mean(axis=1, keepdims=True)
    col = x.mean(axis=0, keepdims=True)
    ms_seed = problems * ((row - grand) ** 2).sum() / (seeds - 1)
    ms_problem = seeds * ((col - grand) ** 2).sum() / (problems - 1)
    ms_residual = ((x - row - col + grand) ** 2).sum() / ((seeds - 1) * (problems - 1))
    return float(ms_seed), float(ms_problem), float(ms_residual)


def _weights(x: np.ndarray) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """The mean squares and the weights that make the variance of the grand mean their sum of products.

    Var = var_seed / S + var_problem / P + var_residual / (S P) with each component solved from its mean
    square, (MS_seeds - MS_residual) / P etc.; a component estimated below zero is floored at 0 and its
    mean squares drop out. Weights are per (MS_seeds, MS_problems, MS_residual), all divided by S P.
    """
    seeds, problems = x.shape
    ms = _mean_squares(x)
    keep_seed = 1.0 if ms[0] > ms[2] else 0.0
    keep_problem = 1.0 if ms[1] > ms[2] else 0.0
    scale = 1.0 / (seeds * problems)
    return ms, (keep_seed * scale, keep_problem * scale, (1.0 - keep_seed - keep_problem) * scale)


def variance_components(matrix: np.ndarray) -> tuple[float, float, float]:
    """(var_seed, var_problem, var_residual) of a (seeds, problems) matrix with at least 2 of each.

    E[MS_seeds] = P var_seed + var_residual, E[MS_problems] = S var_problem + var_residual and
    E[MS_residual] = var_residual; each solved for its component and floored at 0.
    """
    x = np.asarray(matrix, dtype=np.float64)
    seeds, problems = x.shape
    ms_seed, ms_problem, ms_residual = _mean_squares(x)
    return (
        max(0.0, (ms_seed - ms_residual) / problems),
        max(0.0, (ms_problem - ms_residual) / seeds),
        ms_residual,
    )


def crossed_interval(matrix: np.ndarray, confidence: float = 0.95) -> CrossedInterval:
    """The grand mean of `matrix` (seeds x problems) with its crossed t interval and p-value against 0.

    The degrees of freedom are Satterthwaite's for the weighted sum of mean squares, rounded down (at
    least 1): near seeds - 1 when the seeds dominate the variance, more when the problems do. One seed
    (or one problem) gives the mean alone: the seeds' (problems') share cannot be told from the rest.

    Raises:
        ValueError: for an empty matrix or one with non-finite entries.
    """
    x = np.asarray(matrix, dtype=np.float64)
    if x.ndim != 2 or x.size == 0:
        raise ValueError(
            f"a crossed interval needs a non-empty (seeds, problems) matrix, got shape {x.shape}"
        )
    if not np.isfinite(x).all():
        raise ValueError("a crossed interval needs finite per-problem values")
    seeds, problems = x.shape
    mean = float(x.mean())
    if seeds < 2 or problems < 2:
        return CrossedInterval(seeds, problems, mean, None, None, None, None, 0.0, 0.0, 0.0)
    ms, weights = _weights(x)
    variance = sum(w * m for w, m in zip(weights, ms, strict=True))
    dofs = (seeds - 1, problems - 1, (seeds - 1) * (problems - 1))
    spread = sum((w * m) ** 2 / d for w, m, d in zip(weights, ms, dofs, strict=True))
    df = max(1, math.floor(variance**2 / spread)) if spread > 0 else seeds - 1
    se = math.sqrt(max(variance, 0.0))
    half = t_quantile((1 + confidence) / 2, df) * se
    p = t_two_sided_p(mean / se, df) if se > 0 else (1.0 if mean == 0 else 0.0)
    return CrossedInterval(seeds, problems, mean, se, half, p, df, *variance_components(x))


def aligned_matrix(per_seed: Mapping[object, tuple[Sequence, np.ndarray]]) -> np.ndarray | None:
    """Per-seed (problem ids, values) as a (seeds, problems) matrix with the columns in one id order.

    Returns None when the seeds were not evaluated on the same problems (then seeds and problems are not
    crossed, and no crossed interval exists).
    """
    if not per_seed:
        return None
    seeds = sorted(per_seed, key=str)
    reference = list(per_seed[seeds[0]][0])
    rows = []
    for seed in seeds:
        ids, values = per_seed[seed]
        if len(ids) != len(reference) or set(ids) != set(reference) or len(set(ids)) != len(ids):
            return None
        position = {problem: i for i, problem in enumerate(ids)}
        rows.append(np.asarray(values, dtype=np.float64)[[position[p] for p in reference]])
    return np.stack(rows)


def _per_seed_values(runs: Mapping, seeds: Sequence, metric: str) -> dict:
    """seed -> (problem ids, per-problem values of `metric`) for the seeds whose results determine it."""
    found = {}
    for seed in seeds:
        values = runs[seed].problems.per_problem(metric)
        if values is not None:
            found[seed] = (runs[seed].problems.ids, values)
    return found


def _per_seed_differences(runs: Mapping, base: Mapping, seeds: Sequence, metric: str) -> dict:
    """seed -> (problem ids, variant - baseline per problem, paired by id) over the seeds both ran."""
    found = {}
    for seed in seeds:
        mine, theirs = runs[seed].problems.per_problem(metric), base[seed].problems.per_problem(metric)
        if mine is not None and theirs is not None:
            order = matching_problems(runs[seed], base[seed])  # raises when the problems differ
            found[seed] = (runs[seed].problems.ids, mine - theirs[order])
    return found


def crossed_comparison(
    grouped: Mapping[str, Mapping[object, object]],
    variants: Sequence[str],
    baseline: str,
    metrics: Sequence[str],
    confidence: float,
) -> tuple[dict[str, dict[str, CrossedInterval]], dict[str, dict[str, CrossedInterval]]]:
    """Per variant, and per variant against the baseline, the crossed interval of every metric that the
    runs' per-problem results determine, where the seeds were evaluated on the same problems.

    Args:
        grouped: variant -> seed -> run (an `eopd.comparison.RunRecord`: .problems, .source, .variant).

    Returns:
        (per variant, per variant but the baseline): variant -> metric -> interval.
    """
    summary: dict[str, dict[str, CrossedInterval]] = {}
    difference: dict[str, dict[str, CrossedInterval]] = {}
    base = grouped[baseline]
    for variant in variants:
        runs = grouped[variant]
        seeds = sorted((s for s, r in runs.items() if r.problems is not None), key=str)
        paired = [s for s in seeds if s in base and base[s].problems is not None]
        for metric in metrics:
            matrix = aligned_matrix(_per_seed_values(runs, seeds, metric))
            if matrix is not None:
                summary.setdefault(variant, {})[metric] = crossed_interval(matrix, confidence)
            if variant == baseline:
                continue
            matrix = aligned_matrix(_per_seed_differences(runs, base, paired, metric))
            if matrix is not None:
                difference.setdefault(variant, {})[metric] = crossed_interval(matrix, confidence)
    return summary, difference


# ---- output ----------------------------------------------------------------------------------------------


def format_crossed_cell(interval: CrossedInterval | None, signed: bool = False, with_p: bool = False) -> str:
    """`mean ± half-width`, with `(p=...)` for a difference; `mean (1 seed)` without an interval; `-`
    where the per-problem results do not determine the metric."""
    if interval is None:
        return "-"
    if interval.half_width is None:
        return f"{fmt_number(interval.mean, signed)} (1 seed)"
    cell = f"{fmt_number(interval.mean, signed)} ± {fmt_number(interval.half_width)}"
    return f"{cell} (p={interval.p_value:.2g})" if with_p and interval.p_value is not None else cell


def _shape(row: Mapping[str, CrossedInterval]) -> str:
    widest = max(row.values(), key=lambda i: (i.seeds, i.problems), default=None)
    return "-" if widest is None else f"{widest.seeds}×{widest.problems}"


def crossed_tables(comparison: object, metrics: Sequence[str]) -> list[str]:
    """The crossed intervals as markdown lines, per variant and against the baseline; none when no
    metric shown has per-problem results on the same problems for every seed."""
    if not any(m in row for row in comparison.crossed.values() for m in metrics):
        return []
    level = f"{comparison.confidence:.0%}"
    lines = [
        f"Seeds and problems crossed, {level} (the verdicts' intervals): grand mean over seeds × problems ± "
        "t half-width with seeds - 1 dof, the standard error from the variance components of seeds, "
        "problems and their interaction (`eopd.crossed`); `-` where the per-problem results do not "
        "determine the metric.",
        "",
    ]
    lines += markdown_table(
        "seeds×problems",
        metrics,
        (
            (variant, _shape(row), [format_crossed_cell(row.get(m)) for m in metrics])
            for variant, row in comparison.crossed.items()
        ),
    )
    if comparison.crossed_difference:
        lines += [
            "",
            f"Paired difference against `{comparison.baseline}`, seeds and problems crossed, {level}: variant - "
            "baseline per seed and problem (paired by id), the same interval; p is the two-sided p-value "
            "of each comparison alone (Holm's adjustment is in the verdicts).",
            "",
        ]
        lines += markdown_table(
            "paired seeds×problems",
            metrics,
            (
                (variant, _shape(row), [format_crossed_cell(row.get(m), True, True) for m in metrics])
                for variant, row in comparison.crossed_difference.items()
            ),
        )
    return lines


# Appended to comparison.csv when any interval is crossed: per variant, then against the baseline.
CROSSED_CSV_COLUMNS = (
    "crossed_seeds",
    "crossed_problems",
    "crossed_mean",
    "crossed_se",
    "crossed_ci_low",
    "crossed_ci_high",
    "crossed_diff_seeds",
    "crossed_diff_problems",
    "crossed_diff_mean",
    "crossed_diff_se",
    "crossed_diff_ci_low",
    "crossed_diff_ci_high",
    "crossed_diff_p",
)


def crossed_csv_cells(comparison: object, variant: str, metric: str) -> list:
    """The `CROSSED_CSV_COLUMNS` cells of one variant and metric; empty where there is no interval."""

    def number(x: float | None) -> str:
        return "" if x is None else repr(float(x))

    cells: list = []
    for table, width in ((comparison.crossed, 6), (comparison.crossed_difference, 7)):
        i = table.get(variant, {}).get(metric)
        if i is None:
            cells += [""] * width
            continue
        cells += [i.seeds, i.problems, *(number(x) for x in (i.mean, i.se, i.low, i.high))]
        if width == 7:
            cells.append(number(i.p_value))
    return cells
