"""Does the embedded default hold on any machine? Build seeds x CPU kernels x thread counts, one table.

    .venv/bin/python scripts/robustness.py                          # 3 seeds x 2 kernels x {1, 2} threads
    .venv/bin/python scripts/robustness.py --seeds 0 --threads 1    # one cell per kernel
    .venv/bin/python scripts/robustness.py --out docs/robustness.md # also write the table as markdown
    .venv/bin/python scripts/robustness.py --reuse                  # cells already finished are read, not rerun
    .venv/bin/python scripts/robustness.py --collect-only           # the table of the finished cells; runs nothing

Each cell builds the pair from nothing with its seed (both models' initialisation and data order; the
task and its splits stay fixed, so every cell is evaluated on the same test problems) under its kernels
(`ATEN_CPU_CAPABILITY`) and thread count (`OMP_NUM_THREADS`, `pair.build.threads`), then runs the default
distillation exactly as `make train` does (`python -m eopd.train`, plus the cell's overrides) and reads its
final evaluation. Tiny models on a CPU are chaotic in floating-point details, so each cell is a different
pair: the table shows whether the build's targets and the student's improvement survive that.

Kernels: "native" is what torch picks on this machine; "avx2" forces AVX2 kernels. Where the machine's
own choice already is AVX2 the two are the same kernels, so "default" (torch's unvectorised kernels) takes
the avx2 slot and the table says so.

"Improves" compares the student after distillation with the student before, per metric, against the
sampling noise of the final evaluation: the difference must exceed twice its standard error, bounded
from the aggregate values (Avg@k: p(1-p)/(problems*k) per model; Pass@k: p(1-p)/problems, an upper bound
on the variance of a mean of per-problem outcomes), so the test is conservative.

Cells run as separate processes, as many at once as their threads fit in --cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Cell:
    seed: int
    kernels: str
    threads: int
    root: Path
    process: subprocess.Popen | None = None
    started: float = 0.0
    seconds: float = 0.0
    result: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"seed{self.seed}-{self.kernels}-t{self.threads}"


def kernel_choices() -> dict[str, str | None]:
    """Label -> ATEN_CPU_CAPABILITY value (None: the machine's own choice)."""
    native = torch.backends.cpu.get_cpu_capability().lower()
    other = "avx2" if native != "avx2" else "default"  # never the same kernels as "native"
    return {"native": None, other: other}


def command(cell: Cell, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "eopd.train",
        f"output_root={cell.root}",
        f"pair.build.teacher.seed={cell.seed}",
        f"pair.build.student.seed={cell.seed}",
        f"pair.build.threads={cell.threads}",
        f"run_name=robustness-{cell.name}",
        *extra,
    ]


def start(cell: Cell, capability: str | None, extra: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(cell.threads), "HF_HUB_OFFLINE": "1"}
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    cell.root.mkdir(parents=True, exist_ok=True)
    log = open(cell.root / "log.txt", "w")  # noqa: SIM115 - closed with the process
    cell.process = subprocess.Popen(
        command(cell, extra), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    cell.started = time.perf_counter()


def collect(cell: Cell, k: int) -> None:
    cell.seconds = time.perf_counter() - cell.started
    manifest = cell.root / "pairs" / "embedded" / "pair.json"
    pair = json.loads(manifest.read_text()) if manifest.is_file() else {}
    evals = sorted((cell.root / "runs").glob("*/*/eval.json"))
    if cell.process.returncode != 0 or not evals:
        cell.result = {"error": f"exit {cell.process.returncode}; see {cell.root / 'log.txt'}", "pair": pair}
        return
    table = json.loads(evals[-1].read_text())
    cell.result = {"pair": pair, "table": table, "problems": _problems(cell.root), "k": k}
    (cell.root / "cell.json").write_text(json.dumps({"seconds": round(cell.seconds, 1)}))


def finished(cell: Cell) -> bool:
    """Whether the cell's run finished earlier (its evaluation is on disk)."""
    return any((cell.root / "runs").glob("*/*/eval.json"))


def reuse(cell: Cell, k: int) -> None:
    """Read a cell that finished earlier; its time is what that run recorded (else its log's time span)."""
    record = cell.root / "cell.json"
    if record.is_file():
        seconds = json.loads(record.read_text())["seconds"]
    else:  # runs from before cell.json: first to last timestamp of the log (misses the start-up)
        import re
        from datetime import datetime

        stamps = re.findall(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", (cell.root / "log.txt").read_text(), re.M)
        first, last = (datetime.fromisoformat(stamps[i]) for i in (0, -1))
        seconds = (last - first).total_seconds()
    cell.process = subprocess.CompletedProcess([], 0)
    cell.started = time.perf_counter() - seconds
    collect(cell, k)


def _problems(root: Path) -> int:
    from omegaconf import OmegaConf

    config = OmegaConf.load(sorted((root / "runs").glob("*/*/config.yaml"))[-1])
    return int(config.eval.final.n_problems)


def noise(before: float, after: float, problems: int, samples: int) -> float:
    """Standard error of after - before from the two models' sampling noise (a conservative bound)."""
    return math.sqrt((before * (1 - before) + after * (1 - after)) / (problems * samples))


def row(cell: Cell) -> list[str]:
    r = cell.result
    pair = r.get("pair", {})
    missed = [role for role in ("teacher", "student") if not pair.get(role, {}).get("target_met")]
    targets = "yes" if not missed else "NO: " + ", ".join(missed)
    head = [cell.name, targets]
    if "error" in r:
        return [*head, r["error"], "", "", "", "", f"{cell.seconds:.0f}"]
    k, n = r["k"], r["problems"]
    before, after, teacher = (r["table"][name] for name in ("student before", "student after", "teacher"))
    verdicts = []
    for key, samples in ((f"avg@{k}", k), (f"pass@{k}", 1)):
        diff = after[key] - before[key]
        verdicts.append(diff > 2 * noise(before[key], after[key], n, samples))
    cells = [
        f"{before[f'avg@{k}']:.3f} -> {after[f'avg@{k}']:.3f}",
        f"{before[f'pass@{k}']:.3f} -> {after[f'pass@{k}']:.3f}",
        f"{before['paths/distinct']:.2f} -> {after['paths/distinct']:.2f}",
        f"{teacher[f'avg@{k}']:.3f} / {teacher['entropy/student_high_frac']:.1%}",
        f"{before['entropy/student_high_frac']:.1%} -> {after['entropy/student_high_frac']:.1%}",
        ("avg, pass" if all(verdicts) else "avg" if verdicts[0] else "pass" if verdicts[1] else "NO"),
        f"{cell.seconds:.0f}",
    ]
    return [*head, *cells]


HEADER = [
    "cell",
    "targets",
    "student Avg@8",
    "student Pass@8",
    "distinct correct paths",
    "teacher Avg@8 / high-H",
    "student high-H",
    "improves (> 2 SE)",
    "seconds",
]


def markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--kernels", nargs="+", default=None, help="labels of kernel_choices(); default all")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--root", type=Path, default=ROOT / "outputs" / "robustness")
    parser.add_argument("--out", type=Path, default=None, help="write the table (markdown) here too")
    parser.add_argument(
        "--reuse", action="store_true", help="read cells that already finished instead of rerunning them"
    )
    parser.add_argument(
        "--collect-only", action="store_true", help="run nothing: the table of finished cells"
    )
    parser.add_argument("overrides", nargs="*", help="extra eopd.train overrides for every cell")
    args = parser.parse_args()

    choices = kernel_choices()
    labels = args.kernels or list(choices)
    cells = [
        Cell(seed, label, threads, args.root / f"seed{seed}-{label}-t{threads}")
        for seed in args.seeds
        for label in labels
        for threads in args.threads
    ]
    print(
        f"{len(cells)} cells on {args.cores} cores; this machine's kernels: "
        f"{torch.backends.cpu.get_cpu_capability()}; kernel labels: {choices}",
        flush=True,
    )
    wall = time.perf_counter()
    pending, running = list(cells), []
    if args.reuse or args.collect_only:
        for cell in [c for c in pending if finished(c)]:
            reuse(cell, k=8)
            pending.remove(cell)
            print(f"read {cell.name}: {' | '.join(row(cell))}", flush=True)
    if args.collect_only:
        cells = [c for c in cells if c not in pending]
        pending = []
    while pending or running:
        for cell in list(pending):
            # A cell starts when its threads fit beside the running ones (or nothing runs).
            if running and cell.threads > args.cores - sum(c.threads for c in running):
                continue
            start(cell, choices[cell.kernels], args.overrides)
            print(f"started {cell.name}", flush=True)
            pending.remove(cell)
            running.append(cell)
        time.sleep(2)
        for cell in [c for c in running if c.process.poll() is not None]:
            running.remove(cell)
            collect(cell, k=8)
            print(f"finished {cell.name} in {cell.seconds:.0f} s: {' | '.join(row(cell))}", flush=True)
    table = markdown([row(c) for c in cells])
    print(f"\n{table}\n\nwall time {time.perf_counter() - wall:.0f} s", flush=True)
    if args.out is not None:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
