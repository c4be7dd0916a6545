"""The fused objective against its bare matrix products, alternating in one process on the same inputs.

    .venv/bin/python scripts/bench_fused_vs_bare.py                       # large size, eopd and fkl, 4 pairs
    ATEN_CPU_CAPABILITY=default .venv/bin/python scripts/bench_fused_vs_bare.py

`scripts/bench_objectives.py --rounds` times each variant in a fresh process, which its memory column
needs; on a shared machine the load moves between those processes by a fifth or more, and a ratio of
two single runs moves with it. Here one process per objective builds the inputs of
`bench_objectives.py` once (same sizes, rollout, seed and threads) and then times bare, fused, bare,
fused, ... `--pairs` times (one untimed call of each first). Contention only ever adds time, so besides
each pair's ratio and the ratio of the medians it prints the ratio of the fastest run of each variant:
the two least disturbed runs.

Then `--profiled` more fused calls run under `torch.profiler`, and each one's wall time is divided by
the time its own matrix products took inside it (`aten::mm`, `aten::addmm`, `aten::addmm_`): a ratio
to the same products that a change of the host's speed between two calls cannot move, since both
sides come from one call. Nothing here is a test: it prints seconds and ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context

import torch
from bench_objectives import (
    DEFAULT_CHUNK,
    OBJECTIVES,
    SIZES,
    TARGET_BARE_RATIO,
    Job,
    bare_products,
    fused_loss,
    in_fresh_process,
    make_inputs,
)

PRODUCTS = ("aten::mm", "aten::addmm", "aten::addmm_")


def alternate(job: Job, pairs: int, profiled: int) -> dict:
    """Worker: bare and fused calls alternating on one set of inputs -> their wall times."""
    torch.set_num_threads(job.threads)
    torch.manual_seed(job.seed)
    x = make_inputs(job)

    def bare() -> None:
        bare_products(job.objective, x, job.chunk_size)

    def fused() -> None:
        x.hidden_s.grad = x.weight_s.grad = None
        loss, _ = fused_loss(job.objective, x, job.chunk_size)
        loss.backward()

    times: dict[str, list[float]] = {"bare": [], "fused": []}
    for index in range(pairs + 1):
        for name, call in (("bare", bare), ("fused", fused)):
            start = time.perf_counter()
            call()
            if index > 0:  # the first pair warms up (thread pool, first touch of the buffers)
                times[name].append(time.perf_counter() - start)
    times["own"] = []
    for _ in range(profiled):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            start = time.perf_counter()
            fused()
            wall = time.perf_counter() - start
        products = sum(e.self_cpu_time_total for e in profile.key_averages() if e.key in PRODUCTS) / 1e6
        times["own"].append(wall / products)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=list(SIZES), default="large")
    parser.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES))
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK)
    parser.add_argument("--pairs", type=int, default=4, help="timed bare/fused pairs per objective")
    parser.add_argument(
        "--profiled",
        type=int,
        default=2,
        help="fused calls timed against their own products, after the pairs",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()

    capability = torch.backends.cpu.get_cpu_capability()
    print(f"{args.size} size, {args.threads} threads, kernels {capability}, chunk {args.chunk_size}")
    print(f"load average at start: {os.getloadavg()[0]:.1f}")
    base = Job(args.size, "", "rollout", args.chunk_size, "float32", "cpu", 1, args.seed, args.threads)
    base = replace(base, rollout=in_fresh_process(base)["rollout"])
    print(
        f"{'objective':>9} {'bare s':>24} {'fused s':>24} {'fused / bare per pair':>28} {'medians':>8} {'fastest':>8}"
        f"  fused / its own products"
    )
    for objective in args.objectives:
        job = replace(base, objective=objective, variant="fused")
        times = in_fresh_process_call(job, args.pairs, args.profiled)
        bare, fused = times["bare"], times["fused"]
        pairs = [f / b for b, f in zip(bare, fused, strict=True)]
        medians = f"{statistics.median(fused) / statistics.median(bare):8.2f}" if pairs else f"{'-':>8}"
        fastest = f"{min(fused) / min(bare):8.2f}" if pairs else f"{'-':>8}"
        print(
            f"{objective:>9} {', '.join(f'{t:.1f}' for t in bare):>24} {', '.join(f'{t:.1f}' for t in fused):>24}"
            f" {', '.join(f'{r:.2f}' for r in pairs):>28} {medians} {fastest}"
            f"  {', '.join(f'{r:.3f}' for r in times['own'])}"
        )
        sys.stdout.flush()
    print(
        f"load average at end: {os.getloadavg()[0]:.1f}; target: fused <= {TARGET_BARE_RATIO}x its bare products"
    )


def in_fresh_process_call(job: Job, pairs: int, profiled: int) -> dict:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(alternate, job, pairs, profiled).result()


if __name__ == "__main__":
    main()
