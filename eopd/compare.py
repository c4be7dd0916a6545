"""Compares finished runs across variants and seeds: final metrics with confidence intervals, paired
differences against a baseline, training curves, Pass@k against k, and a markdown report.

    python -m eopd.compare outputs/sweeps/gates/2026-01-01_12-00-00            # every run under a folder
    python -m eopd.compare run_a/ run_b/ run_c/ --baseline opd --out compare/  # chosen run directories
    python -m eopd.compare outputs/sweeps/tau_alpha/<time> --by objective.tau --by objective.alpha \
        --baseline "tau=0.8,alpha=1.0"                                         # variants from config keys
    python -m eopd.compare my-entity/eopd/gates                                # a wandb group (online only)

A run is a folder holding `config.yaml` and `metrics.csv` (what `eopd.train` writes). Its variant is the
value of `--by` in its config (default `objective.name`); its seed is `seed`. Final metrics come from
`eval.json` ("student after") when the run has one, otherwise from the last logged value of each column
of `metrics.csv`. Intervals are two-sided t intervals over seeds (n - 1 degrees of freedom); with one
seed there is none. The difference against the baseline is paired: per seed, variant minus baseline,
then the same interval over those differences. Writes report.md, comparison.md, comparison.csv and the
PNG plots into `--out` (default: `<folder>/compare`).

When the runs' eval.json hold per-problem results and every seed saw the same problems, avg@n, pass@k and
paths/distinct also get an interval over seeds and problems crossed (`eopd.crossed`): the first tables,
the CSV's `crossed_*` columns, and the verdicts. A sweep that declares its primary metrics
(`study.primary`) gets a verdict per variant and primary metric against the baseline, with Holm's
correction within each family of comparisons it declares (`study.families`: name -> variants; default
one family of every variant). The t intervals over seed means (every metric) and the bootstrap over
problems within seeds (`eopd.bootstrap`, the CSV's `boot_*` columns) follow, each labelled for the share
of the uncertainty it measures.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from eopd.bootstrap import BOOTSTRAP_CSV_COLUMNS, bootstrap_csv_cells, bootstrap_tables
from eopd.compare_plots import (
    CURVES,
    PASS_AT_K_PNG,
    VAL_AVG_PNG,
    plot_curves,
    plot_pass_at_k,
    val_avg_metric,
)
from eopd.comparison import (
    DEFAULT_BY,
    Comparison,
    Interval,
    RunRecord,
    compare,
    config_value,
    is_wandb_path,
    load_records,
)
from eopd.crossed import CROSSED_CSV_COLUMNS, crossed_csv_cells, crossed_tables
from eopd.markdown import fmt_number, markdown_table
from eopd.metrics import FINAL_TABLE, PASS_AT_K, table_rank
from eopd.provenance import describe_commits, read_code_version
from eopd.verdicts import verdict_section


def table_metrics(records: Sequence[RunRecord]) -> list[str]:
    """The final metrics shown by default: those of `eopd.train`'s final table (`eopd.metrics.FINAL_TABLE`)
    that the runs have, in its order, with pass@1 and the largest pass@k only (the plot shows every k),
    and the math benchmarks' mean Avg@k and Pass@k (each benchmark is in the CSV)."""
    keys = {
        k
        for r in records
        for k in r.final
        if table_rank(k)[0] < len(FINAL_TABLE) or re.fullmatch(r"bench/mean/(avg|pass)@\d+", k)
    }
    passes = sorted((k for k in keys if PASS_AT_K.match(k)), key=_metric_order)
    shown = [k for k in keys if not PASS_AT_K.match(k)]
    if passes:
        shown += {passes[0], passes[-1]}
    return sorted(shown, key=_metric_order)


def _metric_order(name: str) -> tuple[int, int, str]:
    return (*table_rank(name), name)


def format_cell(interval: Interval, signed: bool = False) -> str:
    """`mean ± half-width (n=N)`, or `mean (n=1)` where there is no interval."""
    if interval.n == 0:
        return "-"
    if interval.half_width is None:
        return f"{fmt_number(interval.mean, signed)} (n={interval.n})"
    return f"{fmt_number(interval.mean, signed)} ± {fmt_number(interval.half_width)} (n={interval.n})"


def markdown_tables(comparison: Comparison, metrics: Sequence[str] | None = None) -> str:
    """In markdown: with per-problem results, the crossed intervals per variant and against the baseline;
    then the t intervals over seed means (every metric) and the bootstrap over problems within seeds."""
    metrics = list(metrics or comparison.metrics)
    level = f"{comparison.confidence:.0%}"
    lines = crossed_tables(comparison, metrics)
    lines += ["", ""] if lines else []
    lines += [
        f"Over seed means: mean ± {level} confidence half-width (t interval, n-1 dof): the variation between "
        "training seeds on these fixed test problems, not the sampling of the problems.",
        "",
    ]
    lines += markdown_table(
        "seeds",
        metrics,
        (
            (
                variant,
                ",".join(str(s) for s in comparison.seeds[variant]),
                [format_cell(comparison.summary[variant][m]) for m in metrics],
            )
            for variant in comparison.variants
        ),
    )
    if comparison.difference:
        lines += [
            "",
            f"Paired difference against `{comparison.baseline}` over seed means (variant - baseline on the "
            f"same seed; mean ± {level} half-width over seeds both ran; the problems held fixed).",
            "",
        ]
        lines += markdown_table(
            "paired seeds",
            metrics,
            (
                (
                    variant,
                    str(max((d.n for d in diffs.values()), default=0)),
                    [format_cell(diffs[m], signed=True) for m in metrics],
                )
                for variant, diffs in comparison.difference.items()
            ),
        )
    lines += bootstrap_tables(comparison, metrics)
    return "\n".join(lines)


CSV_COLUMNS = (
    "variant",
    "metric",
    "n",
    "mean",
    "std",
    "ci_low",
    "ci_high",
    "baseline",
    "diff_n",
    "diff_mean",
    "diff_ci_low",
    "diff_ci_high",
)


def write_csv(comparison: Comparison, path: Path) -> None:
    """One row per variant and metric (long format); empty cells where an interval is undefined.

    The `crossed_*` and `boot_*` columns follow when any run has per-problem results (see
    `CROSSED_CSV_COLUMNS`, `BOOTSTRAP_CSV_COLUMNS`).
    """

    def cell(x: float | None) -> str:
        return "" if x is None or not math.isfinite(x) else repr(float(x))

    with_bootstrap = bool(comparison.bootstrap or comparison.bootstrap_difference)
    with_crossed = bool(comparison.crossed or comparison.crossed_difference)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            CSV_COLUMNS
            + (CROSSED_CSV_COLUMNS if with_crossed else ())
            + (BOOTSTRAP_CSV_COLUMNS if with_bootstrap else ())
        )
        for variant in comparison.variants:
            for metric in comparison.metrics:
                s = comparison.summary[variant][metric]
                d = comparison.difference.get(variant, {}).get(metric)
                extra = crossed_csv_cells(comparison, variant, metric) if with_crossed else []
                extra += bootstrap_csv_cells(comparison, variant, metric) if with_bootstrap else []
                writer.writerow(
                    [
                        variant,
                        metric,
                        s.n,
                        cell(s.mean),
                        cell(s.std),
                        cell(s.low),
                        cell(s.high),
                        comparison.baseline,
                        d.n if d else "",
                        cell(d.mean) if d else "",
                        cell(d.low) if d else "",
                        cell(d.high) if d else "",
                        *extra,
                    ]
                )


def primary_metrics(records: Sequence[RunRecord]) -> list[str]:
    """The metrics a sweep fixed as primary before running (`study.primary` in its config), when every run
    names the same ones; else none."""
    named = set()
    for record in records:
        try:
            named.add(tuple(config_value(record.config, "study.primary")))
        except (KeyError, TypeError):
            return []
    return list(next(iter(named))) if len(named) == 1 else []


def sweep_provenance(records: Sequence[RunRecord]) -> str:
    """How the local Hydra sweeps behind `records` were run: per sweep folder (one holding
    `multirun.yaml`), its command and its wall time, from its first run's start (the run's `.hydra`
    folder) to its last run's end (its `finished.json`), by file times; "" when no run lies in one."""
    from omegaconf import OmegaConf

    by_folder: dict[Path, list[Path]] = {}
    for record in records:
        run = Path(record.source)
        by_folder.setdefault(run.parent, []).append(run)
    lines = []
    for folder, runs in sorted(by_folder.items()):
        if not (folder / "multirun.yaml").is_file():
            continue
        overrides = OmegaConf.load(folder / "multirun.yaml").hydra.overrides
        command = "python -m eopd.train " + shlex.join([*overrides.task, *overrides.hydra])
        starts = [(r / ".hydra").stat().st_mtime for r in runs if (r / ".hydra").exists()]
        ends = [(r / "finished.json").stat().st_mtime for r in runs if (r / "finished.json").exists()]
        line = f"Sweep: `{command}` ({len(runs)} run{'s' if len(runs) != 1 else ''})."
        if starts and ends:
            line += f" Wall time {(max(ends) - min(starts)) / 60:.1f} min, from its first run's start to its last run's end."
        lines.append(line)
    return "\n".join(lines)


def run_provenance(records: Sequence[RunRecord]) -> str:
    """`sweep_provenance`, then the commits the local runs ran at (their `code.json`)."""
    local = [r for r in records if not is_wandb_path(r.source)]
    commits = describe_commits([read_code_version(Path(r.source)) for r in local]) if local else ""
    return "\n".join(line for line in (sweep_provenance(records), commits) if line)


def write_report(
    records: Sequence[RunRecord],
    out: Path,
    *,
    baseline: str | None = None,
    metrics: Sequence[str] | None = None,
    confidence: float = 0.95,
    command: str = "",
    also_against: Sequence[str] = (),
) -> Comparison:
    """Tables, CSV, plots and report.md for `records` into `out`; returns the comparison.

    `also_against` names more baselines: their paired-difference tables follow in the report, and their
    CSV is `comparison_vs_<baseline>.csv`.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    primary = primary_metrics(records)
    shown = list(metrics) if metrics else table_metrics(records)
    shown = primary + [m for m in shown if m not in primary]
    every = sorted({k for r in records for k in r.final})
    every += [m for m in shown if m not in every]  # a requested metric may be a logged column
    comparison = compare(records, baseline=baseline, metrics=every, confidence=confidence)
    tables = markdown_tables(comparison, shown)
    write_csv(comparison, out / "comparison.csv")
    (out / "comparison.md").write_text(tables + "\n")

    grouped = {v: [r for r in records if r.variant == v] for v in comparison.variants}
    plots: list[tuple[str, str]] = []
    absent: list[str] = []
    curves = list(CURVES)
    val_avg = val_avg_metric(records)
    if val_avg:
        k = val_avg.split("@")[1]
        curves.append((val_avg, VAL_AVG_PNG, f"Validation Avg@{k}", f"Avg@{k}"))
    else:
        absent.append("val/avg@k")
    for metric, png, title, ylabel in curves:
        if plot_curves(grouped, metric, out / png, title=title, ylabel=ylabel, confidence=confidence):
            plots.append((f"{title} (`{metric}`)", png))
        else:
            absent.append(metric)
    if plot_pass_at_k(comparison, records, out / PASS_AT_K_PNG):
        plots.append(("Pass@k against k (final metrics)", PASS_AT_K_PNG))
    else:
        absent.append("pass@k")

    sources = sorted({r.final_source for r in records})
    lines = [
        "# Run comparison",
        "",
        f"Produced by `{command}`." if command else "",
        run_provenance(records),
        "",
        f"{len(records)} runs, {len(comparison.variants)} variants, seeds per variant: "
        + "; ".join(f"{v}: {len(s)}" for v, s in comparison.seeds.items())
        + f". Final metrics from: {', '.join(sources)}"
        + (' ("student after").' if "eval.json" in sources else " (last logged value)."),
    ]
    if len(sources) > 1:
        lines.append("\n**Warning:** the runs' final metrics come from different sources; compare with care.")
    if primary:
        lines += [
            "",
            "Primary metrics, fixed in the sweep's config (`study.primary`) before the runs: "
            + ", ".join(f"`{m}`" for m in primary)
            + ". Every other metric is reported too.",
        ]
    lines += ["", "## Verdicts", "", *verdict_section(records, comparison, primary)]
    lines += ["## Final metrics", "", tables, "", "Every metric of every variant: `comparison.csv`.", ""]
    for other in also_against:
        against = compare(records, baseline=other, metrics=every, confidence=confidence)
        write_csv(against, out / f"comparison_vs_{other}.csv")
        chunks = markdown_tables(against, shown).split("\n\n")  # caption, table, caption, table, ...
        differences = [
            f"{caption}\n\n{table}"
            for caption, table in zip(chunks, chunks[1:], strict=False)
            if caption.startswith("Paired difference against")
        ]
        lines += [
            f"## Against `{other}`",
            "",
            "\n\n".join(differences),
            "",
            f"CSV: `comparison_vs_{other}.csv`.",
            "",
        ]
    lines += ["## Plots", ""]
    for caption, png in plots:
        lines += [f"### {caption}", "", f"![{caption}]({png})", ""]
    if absent:
        lines += [f"Not logged by any run, so not plotted: {', '.join(f'`{m}`' for m in absent)}.", ""]
    lines += ["## Runs", "", "| variant | seed | run | final metrics from |", "|---|---|---|---|"]
    for variant in comparison.variants:
        for record in sorted(grouped[variant], key=lambda r: str(r.seed)):
            lines.append(f"| {variant} | {record.seed} | `{record.source}` | {record.final_source} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return comparison


# ---- entry point -----------------------------------------------------------------------------------------


def _default_out(arguments: Sequence[str]) -> Path:
    if len(arguments) == 1 and Path(arguments[0]).is_dir():
        return Path(arguments[0]) / "compare"
    if len(arguments) == 1 and is_wandb_path(arguments[0]):
        return Path("compare") / arguments[0].replace("/", "_")
    return Path("compare")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eopd.compare",
        description="Compare runs across variants and seeds: tables with confidence intervals, paired "
        "differences against a baseline, plots and a markdown report.",
    )
    parser.add_argument(
        "runs",
        nargs="+",
        help="sweep or run folders (searched for config.yaml + metrics.csv), or a wandb "
        "entity/project/group (online only; not covered by the offline tests)",
    )
    parser.add_argument(
        "--by",
        action="append",
        help="config key naming the variant (repeat for several; default objective.name)",
    )
    parser.add_argument(
        "--baseline", help="variant to take paired differences against (default: opd if present)"
    )
    parser.add_argument(
        "--metrics",
        nargs="+",
        help="metrics for the markdown table (default: accuracy, "
        "coverage and entropy diagnostics); a logged column such as val/avg@4 also works",
    )
    parser.add_argument(
        "--also-against",
        action="append",
        default=[],
        help="another baseline for paired differences (repeatable), e.g. --also-against eopd",
    )
    parser.add_argument("--confidence", type=float, default=0.95, help="interval level (default 0.95)")
    parser.add_argument("--out", type=Path, help="output folder (default: <folder>/compare)")
    args = parser.parse_args(argv)
    if not 0 < args.confidence < 1:
        parser.error("--confidence must lie in (0, 1)")
    command = "python -m eopd.compare " + shlex.join(list(argv) if argv is not None else sys.argv[1:])
    by = tuple(args.by) if args.by else DEFAULT_BY
    try:
        records = load_records(args.runs, by)
        out = args.out or _default_out(args.runs)
        comparison = write_report(
            records,
            out,
            baseline=args.baseline,
            metrics=args.metrics,
            confidence=args.confidence,
            command=command,
            also_against=args.also_against,
        )
    except (FileNotFoundError, KeyError, ValueError) as error:
        print(f"eopd.compare: {error}", file=sys.stderr)
        return 2
    primary = primary_metrics(records)
    shown = args.metrics or primary + [m for m in table_metrics(records) if m not in primary]
    print(markdown_tables(comparison, shown))
    print(f"\nwrote {out / 'report.md'}, comparison.csv, comparison.md and the plots", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
