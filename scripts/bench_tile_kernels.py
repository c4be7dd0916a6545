"""Time the per-tile kernels of the fused objective against the torch operations they replace.

    .venv/bin/python scripts/bench_tile_kernels.py                      # 256 x 151,936 tiles, 2 threads
    ATEN_CPU_CAPABILITY=default .venv/bin/python scripts/bench_tile_kernels.py

Three comparisons, each timed in this process on the same tensors (median of --repeats calls after one
warm-up call, into buffers already written once):
  - exp of log-probs by their range: torch.exp against `exp_floored` (the input raised to -87 first),
    since torch's CPU exp is slow where its result is subnormal or 0;
  - the row-wise dot sum_v a[n, v] b[n, v] by vocabulary width: einsum against `row_dot`;
  - torch.log_softmax of wide and narrow logits, and (with --flush-denormal, set before the first
    operation so that every thread of the pool inherits it) the same with subnormals flushed to 0.
Nothing here is a test: it prints milliseconds and ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from eopd.objectives.fused import ROW_DOT_LOOP_MIN_COLUMNS, exp_floored, row_dot


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--flush-denormal", action="store_true", help="torch.set_flush_denormal(True) first")
    args = parser.parse_args()
    if args.flush_denormal:
        torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    n, vocab = args.rows, args.vocab
    out = torch.empty(n, vocab)
    capability = torch.backends.cpu.get_cpu_capability()
    print(
        f"torch {torch.__version__}, {args.threads} threads, kernels {capability}, flush denormal {args.flush_denormal}"
    )

    print(f"\nexp of a ({n}, {vocab}) float32 tile, values uniform in the range")
    print(f"{'range':>16} {'torch.exp ms':>13} {'exp_floored ms':>15} {'ratio':>7}")
    for low, high in ((-12, 0), (-80, 0), (-95, -88), (-300, 0), (-1000, -200)):
        x = torch.empty(n, vocab).uniform_(low, high, generator=generator)
        plain = median_ms(lambda x=x: torch.exp(x, out=out), args.repeats)
        floored = median_ms(lambda x=x: exp_floored(x, out=out), args.repeats)
        print(f"{f'[{low}, {high}]':>16} {plain:13.1f} {floored:15.1f} {plain / floored:6.1f}x")

    print(
        f"\nrow-wise dot of two ({n}, V) float32 tensors (one dot per row from {ROW_DOT_LOOP_MIN_COLUMNS} columns)"
    )
    print(f"{'V':>8} {'einsum ms':>10} {'row_dot ms':>11} {'ratio':>7}")
    for columns in (1_000, 4_096, ROW_DOT_LOOP_MIN_COLUMNS, 16_384, 65_536, vocab):
        a = torch.randn(n, columns, generator=generator)
        b = torch.randn(n, columns, generator=generator)
        einsum = median_ms(lambda a=a, b=b: torch.einsum("nv,nv->n", a, b), args.repeats)
        rows = median_ms(lambda a=a, b=b: row_dot(a, b), args.repeats)
        print(f"{columns:8d} {einsum:10.2f} {rows:11.2f} {einsum / rows:6.2f}x")

    print(f"\ntorch.log_softmax of a ({n}, {vocab}) float32 tile")
    for low, high in ((-12, 12), (-300, 30)):
        x = torch.empty(n, vocab).uniform_(low, high, generator=generator)
        took = median_ms(lambda x=x: torch.log_softmax(x, -1, out=out), args.repeats)
        print(f"{f'[{low}, {high}]':>16} {took:8.1f} ms")


if __name__ == "__main__":
    main()
