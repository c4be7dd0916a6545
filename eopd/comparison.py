"""Reading finished runs and comparing them across variants and seeds.

The library behind `python -m eopd.compare` (which writes the tables, plots and report). A run is a folder
holding `config.yaml` and `metrics.csv` (what `eopd.train` writes), or a wandb run. Its variant is the value
of `by` in its config (default `objective.name`); its seed is `seed`. Final metrics come from `eval.json`
("student after") when the run has one, otherwise from the last logged value of each column of
`metrics.csv`.

Three intervals, each for what it measures:
- **Seeds and problems crossed** (`eopd.crossed`), where eval.json holds the trained student's per-problem
  results (avg@n, pass@k, paths/distinct) and every seed saw the same problems: the interval a conclusion
  about new seeds *and* new problems needs; the verdicts use it. Against the baseline, per seed and problem
  (paired by id) variant minus baseline.
- **t interval over seed means** (n - 1 degrees of freedom; none with one seed), for every metric: the
  variation between training seeds on these fixed problems. Against the baseline, paired by seed.
- **Bootstrap over problems within seeds** (`eopd.bootstrap`): the test problems' share with the seeds held
  fixed.
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eopd.bootstrap import BOOTSTRAP_REPLICATES, BootstrapInterval, bootstrap_comparison
from eopd.crossed import CrossedInterval, crossed_comparison
from eopd.metrics import ProblemResults
from eopd.t_distribution import SymmetricBounds, t_quantile

DEFAULT_BY = ("objective.name",)


# ---- statistics ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interval(SymmetricBounds):
    """A mean over n values with the half-width of its confidence interval (None when n < 2)."""

    n: int
    mean: float
    std: float | None = None
    half_width: float | None = None


def mean_interval(values: Iterable[float], confidence: float = 0.95) -> Interval:
    """Mean and two-sided t interval of the finite values (sample std, n - 1 dof); NaNs are dropped."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(finite)
    if n == 0:
        return Interval(0, float("nan"))
    mean = statistics.fmean(finite)
    if n == 1:
        return Interval(1, mean)
    std = statistics.stdev(finite)
    return Interval(n, mean, std, t_quantile((1 + confidence) / 2, n - 1) * std / math.sqrt(n))


def paired_difference(
    variant: Mapping[Any, float], baseline: Mapping[Any, float], confidence: float = 0.95
) -> Interval:
    """Interval of variant - baseline over the seeds both have (finite values only), paired by seed."""
    diffs = [
        variant[s] - baseline[s]
        for s in sorted(set(variant) & set(baseline), key=str)
        if _finite(variant[s]) and _finite(baseline[s])
    ]
    return mean_interval(diffs, confidence)


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


# ---- reading runs ----------------------------------------------------------------------------------------


@dataclass
class RunRecord:
    """One finished run: its variant, seed, final metrics and per-rollout-step curves."""

    name: str
    source: str
    config: dict[str, Any]
    variant: str
    seed: Any
    final: dict[str, float]
    final_source: str  # "eval.json", "metrics.csv" or "wandb"
    last: dict[str, float] = field(default_factory=dict)  # last logged value of every column
    curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # key -> [(step, value)]
    problems: ProblemResults | None = None  # the final student's per-problem results (eval.json)

    def value(self, metric: str) -> float:
        """A final metric; falls back to the last logged value of a column (e.g. `val/avg@4`)."""
        if metric in self.final:
            return self.final[metric]
        return self.last.get(metric, float("nan"))


def config_value(config: Mapping[str, Any], key: str) -> Any:
    """`a.b.c` in a nested config; a flat key `a.b.c` or `a/b/c` (as wandb may store it) also works."""
    node: Any = config
    for part in key.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        else:
            break
    else:
        return node
    for flat in (key, key.replace(".", "/")):
        if flat in config:
            return config[flat]
    raise KeyError(key)


def variant_label(config: Mapping[str, Any], by: Sequence[str]) -> str:
    """The variant a config belongs to: the value of one key, or `name=value,...` for several."""
    values = []
    for key in by:
        try:
            values.append(config_value(config, key))
        except KeyError:
            raise KeyError(f"config has no key {key!r} (set --by to a key of config.yaml)") from None
    if len(by) == 1:
        return str(values[0])
    return ",".join(f"{key.rsplit('.', 1)[-1]}={value}" for key, value in zip(by, values, strict=True))


def parse_history(
    rows: Iterable[Mapping[str, Any]], *, step_key: str, steps_per_rollout: float
) -> tuple[dict[str, list[tuple[float, float]]], dict[str, float]]:
    """Per-metric curves over rollout steps and the last value of each metric, from logged rows.

    Rows may be sparse (a metric missing, empty or non-numeric in a row is skipped). The x of a row is
    its `step/rollout` when it has one (training rows), else `step_key / steps_per_rollout` (validation
    rows are logged at the optimizer step that ends a rollout step), so every metric shares one axis.
    """
    curves: dict[str, list[tuple[float, float]]] = defaultdict(list)
    last: dict[str, float] = {}
    for row in rows:
        values = {k: _number(v) for k, v in row.items() if not k.startswith("_") and k != step_key}
        values = {k: v for k, v in values.items() if v is not None}
        if not values:
            continue
        values |= _high_frac_gaps(values)
        x = values.get("step/rollout")
        if x is None:
            step = _number(row.get(step_key))
            if step is None:
                continue
            x = step / steps_per_rollout
        for key, value in values.items():
            if key in ("step/rollout", "epoch", "trainer/global_step"):
                continue
            curves[key].append((x, value))
            last[key] = value
    for points in curves.values():
        points.sort(key=lambda p: p[0])
    return dict(curves), last


def _high_frac_gaps(values: Mapping[str, float]) -> dict[str, float]:
    """`entropy/high_frac_gap` (and `val/...`): the student's high-entropy fraction minus the teacher's on
    the same samples, where a row logs both; below zero, the student is surer than its teacher (the
    collapse the paper attributes to reverse KL)."""
    gaps = {}
    for prefix in ("", "val/"):
        student = values.get(f"{prefix}entropy/student_high_frac")
        teacher = values.get(f"{prefix}entropy/teacher_high_frac")
        if student is not None and teacher is not None:
            gaps[f"{prefix}entropy/high_frac_gap"] = student - teacher
    return gaps


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str) and value.strip():
        try:
            number = float(value)
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def _steps_per_rollout(config: Mapping[str, Any]) -> float:
    try:
        return float(config_value(config, "total_optimizer_steps")) / float(
            config_value(config, "rollout_steps")
        )
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return 1.0


def find_runs(root: Path) -> list[Path]:
    """Every folder under `root` (itself included) holding both config.yaml and metrics.csv."""
    return sorted(p.parent for p in Path(root).rglob("config.yaml") if (p.parent / "metrics.csv").is_file())


def read_run(run_dir: Path | str, by: Sequence[str] = DEFAULT_BY) -> RunRecord:
    """A run folder written by `eopd.train` as a record."""
    from omegaconf import OmegaConf

    run_dir = Path(run_dir)
    config = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=False)
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    curves, last = parse_history(rows, step_key="step", steps_per_rollout=_steps_per_rollout(config))
    final, final_source = dict(last), "metrics.csv"
    problems = None
    eval_path = run_dir / "eval.json"
    if eval_path.is_file():
        saved = json.loads(eval_path.read_text())
        after = saved.get("student after")
        if after:
            final = {k: float(v) for k, v in after.items() if _number(v) is not None}
            final |= _high_frac_gaps(final)
            final_source = "eval.json"
            saved_problems = (saved.get("problems") or {}).get("student after")
            if saved_problems:  # absent from eval.json written before per-problem results existed
                problems = ProblemResults.from_json(saved_problems)
        benchmarks = (saved.get("benchmarks") or {}).get("student after")
        if benchmarks:  # {benchmark or "mean": {metric: value}}, from the math benchmarks
            final.update(
                {
                    f"bench/{name}/{metric}": float(value)
                    for name, metrics in benchmarks.items()
                    for metric, value in metrics.items()
                    if _number(value) is not None
                }
            )
            final_source = "eval.json"
    return RunRecord(
        name=run_dir.name,
        source=str(run_dir),
        config=config,
        variant=variant_label(config, by),
        seed=config.get("seed"),
        final=final,
        final_source=final_source,
        last=last,
        curves=curves,
        problems=problems,
    )


# ---- wandb (needs network access and a login: not covered by the offline tests) ------------------------


def is_wandb_path(argument: str) -> bool:
    """`entity/project/group` that is not an existing path."""
    parts = argument.split("/")
    return len(parts) == 3 and all(parts) and not Path(argument).exists()


def record_from_wandb_run(run: Any, by: Sequence[str] = DEFAULT_BY) -> RunRecord:
    """A `wandb.apis.public.Run` (anything with .name, .config, .scan_history()) as a record.

    Final metrics are the last logged values: eval.json is not uploaded.
    """
    config = dict(run.config)
    step_key = "trainer/global_step"  # what Lightning's WandbLogger logs as the step
    rows = list(run.scan_history())
    if rows and not any(step_key in row for row in rows):
        step_key = "_step"
    curves, last = parse_history(rows, step_key=step_key, steps_per_rollout=_steps_per_rollout(config))
    return RunRecord(
        name=str(run.name),
        source=str(getattr(run, "url", run.name)),
        config=config,
        variant=variant_label(config, by),
        seed=config_value(config, "seed"),
        final=dict(last),
        final_source="wandb",
        last=last,
        curves=curves,
    )


def wandb_records(path: str, by: Sequence[str] = DEFAULT_BY) -> list[RunRecord]:
    """The finished runs of the wandb group `entity/project/group` (online; untested offline)."""
    import wandb

    entity, project, group = path.split("/")
    runs = wandb.Api().runs(f"{entity}/{project}", filters={"group": group})
    return [record_from_wandb_run(run, by) for run in runs if getattr(run, "state", "finished") == "finished"]


# ---- the comparison --------------------------------------------------------------------------------------


@dataclass
class Comparison:
    """Per variant and metric: the interval over seeds and the paired difference against the baseline, and
    where runs have per-problem results, the same two from the bootstrap over problems within seeds."""

    variants: list[str]
    baseline: str | None
    metrics: list[str]
    confidence: float
    summary: dict[str, dict[str, Interval]]  # variant -> metric -> interval over seeds
    difference: dict[str, dict[str, Interval]]  # variant (not the baseline) -> metric -> paired difference
    seeds: dict[str, list[Any]]
    # variant -> metric -> bootstrap over problems within seeds; only variants and metrics that have one
    bootstrap: dict[str, dict[str, BootstrapInterval]] = field(default_factory=dict)
    bootstrap_difference: dict[str, dict[str, BootstrapInterval]] = field(default_factory=dict)
    replicates: int = BOOTSTRAP_REPLICATES
    # variant -> metric -> interval over seeds and problems crossed (eopd.crossed); the verdicts use these
    crossed: dict[str, dict[str, CrossedInterval]] = field(default_factory=dict)
    crossed_difference: dict[str, dict[str, CrossedInterval]] = field(default_factory=dict)


def by_variant_and_seed(records: Sequence[RunRecord]) -> dict[str, dict[Any, RunRecord]]:
    """Records grouped by variant, then seed; two runs of one variant and seed are an error."""
    grouped: dict[str, dict[Any, RunRecord]] = defaultdict(dict)
    for record in records:
        other = grouped[record.variant].get(record.seed)
        if other is not None:
            hint = ", ".join(_differing_keys([other.config, record.config])) or "none"
            raise ValueError(
                f"two runs of variant {record.variant!r} with seed {record.seed}: {other.source} and "
                f"{record.source}. Tell them apart with --by (config keys that differ: {hint}) or pass "
                "fewer folders."
            )
        grouped[record.variant][record.seed] = record
    return dict(grouped)


def _differing_keys(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    flats = [_flatten(c) for c in configs]
    ignored = {"run_name", "tags", "output_root", "group"}
    keys = sorted(set().union(*flats))
    return [k for k in keys if k not in ignored and len({repr(f.get(k)) for f in flats}) > 1]


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def order_variants(variants: Iterable[str], baseline: str | None) -> list[str]:
    """The baseline first, then the others in natural order (numbers by value)."""

    def key(label: str):
        parts = re.split(r"(-?\d+(?:\.\d+)?(?:e-?\d+)?)", label)
        return [(0, float(p), "") if i % 2 else (1, 0.0, p) for i, p in enumerate(parts)]

    rest = sorted((v for v in set(variants) if v != baseline), key=key)
    return ([baseline] if baseline in set(variants) else []) + rest


def compare(
    records: Sequence[RunRecord],
    *,
    baseline: str | None = None,
    metrics: Sequence[str] | None = None,
    confidence: float = 0.95,
    replicates: int = BOOTSTRAP_REPLICATES,
) -> Comparison:
    """Intervals over seeds per variant and metric, and paired differences against `baseline`; for runs
    with per-problem results, also the bootstrap over problems within seeds (see the module docstring).

    `baseline` None picks `opd` when present, else the first variant. `metrics` None takes every final
    metric of any run.

    Raises:
        ValueError: for an unknown baseline, two runs of one variant and seed, or a variant's and the
            baseline's runs of one seed evaluated on different problems.
    """
    if not records:
        raise ValueError("no runs to compare")
    grouped = by_variant_and_seed(records)
    if baseline is None:
        baseline = "opd" if "opd" in grouped else order_variants(grouped, None)[0]
    elif baseline not in grouped:
        raise ValueError(f"baseline {baseline!r} is not a variant; variants: {', '.join(sorted(grouped))}")
    variants = order_variants(grouped, baseline)
    if metrics is None:
        metrics = sorted({k for r in records for k in r.final})
    summary: dict[str, dict[str, Interval]] = {}
    difference: dict[str, dict[str, Interval]] = {}
    for variant in variants:
        runs = grouped[variant]
        summary[variant] = {
            m: mean_interval((r.value(m) for r in runs.values()), confidence) for m in metrics
        }
        if variant != baseline:
            base = grouped[baseline]
            difference[variant] = {
                m: paired_difference(
                    {s: r.value(m) for s, r in runs.items()},
                    {s: r.value(m) for s, r in base.items()},
                    confidence,
                )
                for m in metrics
            }
    seeds = {v: sorted(grouped[v], key=str) for v in variants}
    bootstrap, bootstrap_difference = bootstrap_comparison(
        grouped, variants, baseline, metrics, confidence, replicates
    )
    crossed, crossed_difference = crossed_comparison(grouped, variants, baseline, metrics, confidence)
    return Comparison(
        variants,
        baseline,
        list(metrics),
        confidence,
        summary,
        difference,
        seeds,
        bootstrap,
        bootstrap_difference,
        replicates,
        crossed,
        crossed_difference,
    )


def load_records(arguments: Sequence[str], by: Sequence[str] = DEFAULT_BY) -> list[RunRecord]:
    """Records from folders (searched for runs) and wandb groups (`entity/project/group`)."""
    records: list[RunRecord] = []
    for argument in arguments:
        if is_wandb_path(argument):
            found = wandb_records(argument, by)
        elif Path(argument).is_dir():
            found = [read_run(d, by) for d in find_runs(Path(argument))]
        else:
            raise FileNotFoundError(f"{argument} is neither a folder nor a wandb entity/project/group")
        if not found:
            raise FileNotFoundError(f"no runs (folders with config.yaml and metrics.csv) under {argument}")
        records += found
    return records
