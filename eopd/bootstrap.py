"""The bootstrap over problems within seeds: intervals from runs' per-problem results, and their tables.

`eopd.comparison.compare` calls `bootstrap_comparison`; `eopd.compare` writes `bootstrap_tables` and the
`BOOTSTRAP_CSV_COLUMNS`. Per seed, each run's `eopd.metrics.ProblemResults` give one value per problem of
avg@n, pass@k or paths/distinct. A replicate resamples each seed's problems with replacement
(independently per seed), takes the mean over problems in each seed, then the mean over seeds; the
interval is a pair of percentiles of the replicates. Against a baseline, problems are paired by id within
a seed and the per-problem differences are resampled, which resamples both runs at the same problems. The
seeds are not resampled: this is the test set's share of the uncertainty, the t interval over seed means
(`eopd.comparison.mean_interval`) the variation between seeds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from eopd.markdown import fmt_number, markdown_table

BOOTSTRAP_REPLICATES = 2000
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class BootstrapInterval:
    """A mean over seeds of per-seed means over problems, with the percentile interval of its bootstrap.

    Attributes:
        problems: problems per seed, one entry per seed that took part.
        mean: the estimate (not the replicates' mean): mean over seeds of the mean over problems.
        low, high: the (1 - confidence) / 2 and (1 + confidence) / 2 quantiles of the replicates.
    """

    problems: tuple[int, ...]
    mean: float
    low: float
    high: float

    @property
    def seeds(self) -> int:
        return len(self.problems)


_BOOTSTRAP_BLOCK = 256  # replicates drawn at once: (256, num_problems) indices


def bootstrap_over_problems(
    per_seed: Sequence[np.ndarray],
    *,
    confidence: float = 0.95,
    replicates: int = BOOTSTRAP_REPLICATES,
    seed: int = BOOTSTRAP_SEED,
) -> BootstrapInterval:
    """Mean over seeds of the mean over problems, with a percentile interval from resampling problems.

    A replicate draws, in every seed independently, as many problems as the seed has, with replacement,
    and takes the mean over seeds of the means over the drawn problems. For a paired difference pass the
    per-problem differences variant - baseline: resampling them resamples both variants at the same
    problems. A fresh generator from `seed` per call, so the same input gives the same interval, and
    seeds with equally many problems draw the same indices for every metric and variant.

    Args:
        per_seed: one (num_problems,) array of per-problem values per seed.
        confidence: the interval's level.
        replicates: bootstrap replicates.
        seed: the generator's seed.

    Raises:
        ValueError: without seeds, or for a seed without problems.
    """
    if not per_seed or any(len(values) == 0 for values in per_seed):
        raise ValueError("the bootstrap needs at least one seed, and every seed at least one problem")
    rng = np.random.default_rng(seed)
    replicate_means = np.zeros(replicates)
    for values in per_seed:
        values = np.asarray(values, dtype=np.float64)
        for start in range(0, replicates, _BOOTSTRAP_BLOCK):
            rows = min(_BOOTSTRAP_BLOCK, replicates - start)
            picks = rng.integers(0, len(values), size=(rows, len(values)))  # (rows, num_problems)
            replicate_means[start : start + rows] += values[picks].mean(axis=1)
    replicate_means /= len(per_seed)
    tail = (1 - confidence) / 2
    low, high = np.quantile(replicate_means, [tail, 1 - tail])
    mean = float(np.mean([np.mean(values) for values in per_seed]))
    return BootstrapInterval(tuple(len(v) for v in per_seed), mean, float(low), float(high))


def matching_problems(variant: Any, baseline: Any) -> np.ndarray:
    """For each of `variant`'s problems, the index of the same problem (by id) among `baseline`'s.

    Args:
        variant, baseline: runs of one seed (`eopd.comparison.RunRecord`s) with per-problem results.

    Raises:
        ValueError: naming both runs, when their problem ids differ or one run repeats an id.
    """
    assert variant.problems is not None and baseline.problems is not None
    for record in (variant, baseline):
        ids = record.problems.ids
        if len(set(ids)) != len(ids):
            repeated = sorted({i for i in ids if ids.count(i) > 1}, key=str)[:3]
            raise ValueError(
                f"run {record.source} repeats problem ids {repeated} in eval.json; the bootstrap pairs "
                "problems by id, so give every record of the evaluated split a unique id"
            )
    index = {problem: i for i, problem in enumerate(baseline.problems.ids)}
    only_variant = [i for i in variant.problems.ids if i not in index]
    only_baseline = sorted(set(index) - set(variant.problems.ids), key=str)
    if only_variant or only_baseline:
        raise ValueError(
            f"runs {variant.source} ({variant.variant}) and {baseline.source} ({baseline.variant}), seed "
            f"{variant.seed}, were evaluated on different problems: {len(only_variant)} ids only in the first "
            f"(e.g. {only_variant[:3]}), {len(only_baseline)} only in the second (e.g. {only_baseline[:3]}). "
            "The bootstrap pairs problems by id: evaluate both on the same data, eval.final.split and "
            "eval.final.n_problems, or leave one of them out of the comparison."
        )
    return np.array([index[i] for i in variant.problems.ids], dtype=np.int64)


def bootstrap_comparison(
    grouped: Mapping[str, Mapping[Any, Any]],
    variants: Sequence[str],
    baseline: str,
    metrics: Sequence[str],
    confidence: float,
    replicates: int,
) -> tuple[dict[str, dict[str, BootstrapInterval]], dict[str, dict[str, BootstrapInterval]]]:
    """Per variant, and per variant against the baseline, the bootstrap of every metric the runs'
    per-problem results determine; seeds without per-problem results take no part.

    Args:
        grouped: variant -> seed -> run (an `eopd.comparison.RunRecord`: .problems, .source, .variant).
        variants: the variants, in the order of the tables.
        baseline: the variant the differences are taken against.
        metrics: the metrics to bootstrap where the per-problem results determine them.

    Returns:
        (per variant, per variant but the baseline): variant -> metric -> interval, holding only the
        variants and metrics that have per-problem results.

    Raises:
        ValueError: when a run and the baseline's run of the same seed list different problem ids.
    """
    summary: dict[str, dict[str, BootstrapInterval]] = {}
    difference: dict[str, dict[str, BootstrapInterval]] = {}
    base = grouped[baseline]

    def interval(per_seed: list) -> BootstrapInterval:
        return bootstrap_over_problems(per_seed, confidence=confidence, replicates=replicates)

    for variant in variants:
        runs = grouped[variant]
        seeds = sorted((s for s, r in runs.items() if r.problems is not None), key=str)
        own = {m: [v for s in seeds if (v := runs[s].problems.per_problem(m)) is not None] for m in metrics}
        if found := {m: interval(per_seed) for m, per_seed in own.items() if per_seed}:
            summary[variant] = found
        if variant == baseline:
            continue
        paired = [s for s in seeds if s in base and base[s].problems is not None]
        order = {s: matching_problems(runs[s], base[s]) for s in paired}  # raises when the problems differ
        diffs: dict[str, list[np.ndarray]] = {}
        for m in metrics:
            for s in paired:
                mine, theirs = runs[s].problems.per_problem(m), base[s].problems.per_problem(m)
                if mine is not None and theirs is not None:
                    diffs.setdefault(m, []).append(mine - theirs[order[s]])
        if found := {m: interval(per_seed) for m, per_seed in diffs.items()}:
            difference[variant] = found
    return summary, difference


# ---- output ----------------------------------------------------------------------------------------------


def format_bootstrap_cell(interval: BootstrapInterval | None, signed: bool = False) -> str:
    """`mean [low, high]`, or `-` where the per-problem results do not determine the metric."""
    if interval is None:
        return "-"
    return f"{fmt_number(interval.mean, signed)} [{fmt_number(interval.low, signed)}, {fmt_number(interval.high, signed)}]"


def _seeds_by_problems(intervals: Iterable[BootstrapInterval]) -> str:
    """`seeds×problems` of the widest interval, e.g. `5×200`, or `5×(180-200)` when seeds differ."""
    widest = max(intervals, key=lambda i: (i.seeds, sum(i.problems)), default=None)
    if widest is None:
        return "-"
    low, high = min(widest.problems), max(widest.problems)
    return f"{widest.seeds}×{low}" if low == high else f"{widest.seeds}×({low}-{high})"


def bootstrap_tables(comparison: Any, metrics: Sequence[str]) -> list[str]:
    """The bootstrap's two tables as markdown lines for `eopd.comparison.Comparison` `comparison`; none
    when no metric shown has per-problem results."""
    shown = {
        m
        for table in (comparison.bootstrap, comparison.bootstrap_difference)
        for row in table.values()
        for m in row
        if m in metrics
    }
    if not shown:
        return []
    level = f"{comparison.confidence:.0%}"
    percentiles = f"{(1 - comparison.confidence) / 2:.1%}, {(1 + comparison.confidence) / 2:.1%}".replace(
        ".0%", "%"
    )
    lines = [
        "",
        f"Bootstrap over problems within seeds, {level} (the test problems' share of the uncertainty, the "
        "seeds held fixed): mean over seeds of the mean over problems "
        f"[{percentiles} percentiles of {comparison.replicates} replicates, each resampling every seed's "
        "problems with replacement]; `-` where the per-problem results do not determine the metric.",
        "",
    ]
    lines += markdown_table(
        "seeds×problems",
        metrics,
        (
            (variant, _seeds_by_problems(row.values()), [format_bootstrap_cell(row.get(m)) for m in metrics])
            for variant, row in comparison.bootstrap.items()
        ),
    )
    if comparison.bootstrap_difference:
        lines += [
            "",
            f"Paired difference against `{comparison.baseline}`, bootstrap over problems within seeds, "
            f"{level}: variant - baseline on the same problems (paired by id) of the same seed, resampled "
            f"together; mean over seeds [{percentiles} percentiles].",
            "",
        ]
        lines += markdown_table(
            "paired seeds×problems",
            metrics,
            (
                (
                    variant,
                    _seeds_by_problems(row.values()),
                    [format_bootstrap_cell(row.get(m), signed=True) for m in metrics],
                )
                for variant, row in comparison.bootstrap_difference.items()
            ),
        )
    return lines


# Appended when any run has per-problem results: the bootstrap over problems within seeds (seeds taking
# part, problems summed over them, estimate, percentile interval), per variant and against the baseline.
BOOTSTRAP_CSV_COLUMNS = (
    "boot_seeds",
    "boot_problems",
    "boot_mean",
    "boot_ci_low",
    "boot_ci_high",
    "boot_diff_seeds",
    "boot_diff_problems",
    "boot_diff_mean",
    "boot_diff_ci_low",
    "boot_diff_ci_high",
)


def bootstrap_csv_cells(comparison: Any, variant: str, metric: str) -> list:
    """The `BOOTSTRAP_CSV_COLUMNS` cells of one variant and metric; empty where there is no interval."""
    cells: list = []
    for table in (comparison.bootstrap, comparison.bootstrap_difference):
        interval = table.get(variant, {}).get(metric)
        if interval is None:
            cells += [""] * 5
        else:
            bounds = (interval.mean, interval.low, interval.high)
            cells += [interval.seeds, sum(interval.problems), *(repr(float(x)) for x in bounds)]
    return cells
