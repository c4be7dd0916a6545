"""Verdicts: each comparison a sweep declared in advance (its variants against the baseline on its primary
metrics, `study.primary`), from the interval over seeds and problems crossed (`eopd.crossed`), with Holm's
correction within each family of comparisons the sweep declares (`study.families`; default one family of
every variant). `eopd.compare` puts them first in its report."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

from eopd.comparison import Comparison, RunRecord, config_value
from eopd.crossed import CrossedInterval
from eopd.markdown import fmt_number


def holm(p_values: Mapping[Hashable, float]) -> dict[Hashable, float]:
    """Holm's step-down adjusted p-values: the i-th smallest p times (m - i + 1), kept monotone, capped at 1.

    A comparison's verdict holds at level alpha, with the family-wise error rate at most alpha over the
    family, when its adjusted p is below alpha.
    """
    ordered = sorted(p_values.items(), key=lambda item: item[1])
    adjusted: dict[Hashable, float] = {}
    running = 0.0
    m = len(ordered)
    for i, (name, p) in enumerate(ordered):
        running = max(running, min(1.0, (m - i) * p))
        adjusted[name] = running
    return adjusted


@dataclass(frozen=True)
class Verdict:
    """One declared comparison (variant - baseline on one metric) with its Holm-adjusted p-value."""

    family: str
    variant: str
    metric: str
    interval: CrossedInterval
    p_holm: float
    holds: bool  # p_holm < 1 - confidence: the difference is not zero, family-wise error controlled


def family_verdicts(
    difference: Mapping[str, Mapping[str, CrossedInterval]],
    families: Mapping[str, Sequence[str]],
    metrics: Sequence[str],
    confidence: float,
) -> tuple[list[Verdict], dict[str, list[str]]]:
    """Holm's correction within each family: its variants x `metrics`, the comparisons against the
    baseline that have a crossed interval with a p-value (at least two seeds).

    Returns:
        (the verdicts, family -> the variants it names that have no such interval: no runs among those
        compared, or no per-problem results; they take no part in the correction).
    """
    verdicts: list[Verdict] = []
    missing: dict[str, list[str]] = {}
    for family, members in families.items():
        if absent := [v for v in members if v not in difference]:
            missing[family] = absent
        tests = {
            (v, m): difference[v][m]
            for v in members
            if v in difference
            for m in metrics
            if m in difference[v] and difference[v][m].p_value is not None
        }
        adjusted = holm({key: interval.p_value for key, interval in tests.items()})
        for (variant, metric), interval in tests.items():
            p = adjusted[(variant, metric)]
            verdicts.append(Verdict(family, variant, metric, interval, p, p < 1 - confidence))
    return verdicts, missing


def verdict_lines(verdicts: Sequence[Verdict], baseline: str, confidence: float) -> list[str]:
    """The verdicts as a markdown table, one row per declared comparison."""
    alpha = 1 - confidence
    lines = [
        "| family | variant - "
        + baseline
        + " | metric | difference | crossed interval | p | p (Holm) | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in verdicts:
        i = v.interval
        verdict = ("higher" if i.mean > 0 else "lower") if v.holds else f"no difference shown at {alpha:g}"
        lines.append(
            f"| {v.family} | {v.variant} | `{v.metric}` | {fmt_number(i.mean, True)} | "
            f"[{fmt_number(i.low, True)}, {fmt_number(i.high, True)}] | {i.p_value:.2g} | {v.p_holm:.2g} | {verdict} |"
        )
    return lines


def declared_families(records: Sequence[RunRecord], comparison: Comparison) -> dict[str, list[str]]:
    """The families of comparisons a sweep declared before running (`study.families`: name -> variants),
    when every run names the same ones; else one family, `all`, of every variant but the baseline."""
    declared = []
    for record in records:
        try:
            declared.append(config_value(record.config, "study.families"))
        except (KeyError, TypeError):
            declared.append(None)
    first = declared[0] if declared else None
    if isinstance(first, Mapping) and first and all(d == first for d in declared):
        return {str(name): [str(v) for v in members] for name, members in first.items()}
    return {"all": [v for v in comparison.variants if v != comparison.baseline]}


def verdict_section(
    records: Sequence[RunRecord], comparison: Comparison, primary: Sequence[str]
) -> list[str]:
    """The report's verdicts: each declared comparison against the baseline on each primary metric, from
    its crossed interval, with Holm's correction within its family; a note where none can be given."""
    if not primary:
        return [
            "No primary metrics were declared (`study.primary` in the sweep's config), so no verdicts: every "
            "interval below stands alone, with no correction for the number of comparisons.",
            "",
        ]
    families = declared_families(records, comparison)
    verdicts, missing = family_verdicts(
        comparison.crossed_difference, families, primary, comparison.confidence
    )
    left_out = [
        f"Declared in family `{name}` but without a crossed interval against `{comparison.baseline}` (no runs "
        f"among those compared, or no per-problem results), so outside its correction: {', '.join(absent)}."
        for name, absent in missing.items()
    ]
    if not verdicts:
        return [
            "No verdicts: the primary metrics have no crossed interval against the baseline (they need "
            "per-problem results in eval.json, the same problems for every seed, and at least two seeds).",
            "",
            *left_out,
        ]
    sizes = "; ".join(
        f"`{name}`: {len(members)} variants × {len(primary)} metrics" for name, members in families.items()
    )
    return [
        f"Each declared comparison against `{comparison.baseline}` on each primary metric, from its interval "
        f"over seeds and problems crossed; Holm's correction within each family ({sizes}), family-wise error "
        f"at most {1 - comparison.confidence:g}. "
        + (
            "Families from the sweep's config (`study.families`)."
            if families != {"all": [v for v in comparison.variants if v != comparison.baseline]}
            else "One family of every variant (the sweep's config declares no `study.families`)."
        ),
        "",
        *verdict_lines(verdicts, comparison.baseline, comparison.confidence),
        "",
        *(line + "\n" for line in left_out),
    ]
