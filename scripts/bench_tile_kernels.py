"""Time the per-tile kernels of the fused objective against the torch operations they replace.

    .venv/bin/python scripts/bench_tile_kernels.py                      # 256 x 151,936 tiles, 2 threads
    ATEN_CPU_CAPABILITY=default .venv/bin/python scripts/bench_tile_kernels.py

Comparisons, each timed in this process on the same tensors (median of --repeats calls after one
warm-up call, into buffers already written once):
  - exp of log-probs by their range: torch.exp against `exp_floored` (the input raised to -87 first),
    since torch's CPU exp is slow where its result is subnormal or 0;
  - the row-wise dot sum_v a[n, v] b[n, v] by vocabulary width: einsum against `row_dot`;
  - torch.log_softmax of wide and narrow logits, and (with --flush-denormal, set before the first
    operation so that every thread of the pool inherits it) the same with subnormals flushed to 0;
    against it `log_softmax_and_exp_` (in place: each call first copies the logits into the buffer it
    overwrites, and that copy is timed alone and subtracted);
  - the k = 16 largest values of each row: torch.topk against `topk_rows`;
  - one tile of the teacher's statistics (log-prob of a token, entropy, top-16), as computed before
    (torch.log_softmax, a floored exp for the probabilities, their dot with the log-probs, torch.topk)
    and as `teacher_token_stats` computes it (`topk_groups` for the rows' maxima, `shifted_exp_`, the
    entropy from the exp, its row sums and the shifted logits, `topk_rows` on those groups), both from a
    copy of the logits;
  - the four row-wise sums of products of two pairs of (n, V) tensors: four `row_dot`s against
    `cross_dots` on two `TileBuffers` pairs (one batched product);
  - the forward KL's gradient from the two exps, e_s (c / s_s) - e_t (c / s_t), at a few tile sizes: a
    multiply and an addcmul against one batched product over a `TileBuffers` pair (which
    `pair_combination` takes from `PAIR_COMBINATION_MIN_VALUES` values per tile);
  - the teacher's shift: its tile's row maxima (amax) against the logits gathered at its top-1 ids
    (as the loss pass reads them from the teacher's statistics);
  - one loss tile of the full-vocabulary forward KL after its two matrix products (the student's
    entropy, both exact KLs, the gradient times its coefficient), as computed before (both models'
    log-probs and probabilities in full, four `row_dot`s, p - p_t) and as the closed-form path computes
    it (`softmaxed` into a pair of buffers, the teacher's shift at its top-1 ids, `exact_kls`, the
    forward KL's dense gradient), both from a copy of the two models' logits.
Nothing here is a test: it prints milliseconds and ratios.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch

from eopd.objectives import tile_softmax
from eopd.objectives.fused import (
    ROW_DOT_LOOP_MIN_COLUMNS,
    TileBuffers,
    exp_floored,
    row_dot,
    topk_groups,
    topk_rows,
)
from eopd.objectives.terms import TERM_KINDS, Tile
from eopd.objectives.tile_softmax import (
    PAIR_COMBINATION_MIN_VALUES,
    cross_dots,
    exact_kls,
    log_softmax_and_exp_,
    log_softmax_and_softmax_,
    pair_combination,
    shifted_exp_,
    softmaxed,
)


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

    work, scratch = torch.empty(n, vocab), torch.empty(n, vocab)
    print(f"\nlog_softmax of a ({n}, {vocab}) float32 tile, logits uniform in the range")
    print("  and with the probabilities: torch.log_softmax then `exp_floored` of the log-probs, against")
    print("  `log_softmax_and_softmax_` (the log-softmax's own exp divided by its row sums)")
    print(
        f"{'range':>16} {'torch ms':>9} {'in place ms':>16} {'ratio':>7} {'+ p ms':>8} {'ours ms':>8} {'ratio':>7}"
    )
    for low, high in ((-12, 12), (-300, 30)):
        x = torch.empty(n, vocab).uniform_(low, high, generator=generator)
        took = median_ms(lambda x=x: torch.log_softmax(x, -1, out=out), args.repeats)
        copy = median_ms(lambda x=x: work.copy_(x), args.repeats)
        ours = median_ms(lambda x=x: log_softmax_and_exp_(work.copy_(x), scratch), args.repeats) - copy
        both = median_ms(
            lambda x=x: exp_floored(torch.log_softmax(x, -1, out=out), out=scratch), args.repeats
        )
        ours_both = (
            median_ms(lambda x=x: log_softmax_and_softmax_(work.copy_(x), scratch), args.repeats) - copy
        )
        print(
            f"{f'[{low}, {high}]':>16} {took:9.1f} {ours:16.1f} {took / ours:6.2f}x"
            f" {both:8.1f} {ours_both:8.1f} {both / ours_both:6.2f}x"
        )

    k = 16
    print(f"\ntop-{k} of each row of a ({n}, {vocab}) float32 tile, values normal with the scale")
    print(f"{'scale':>8} {'torch.topk ms':>14} {'topk_rows ms':>13} {'ratio':>7}")
    for scale in (3.0, 50.0):
        x = torch.randn(n, vocab, generator=generator) * scale
        plain = median_ms(lambda x=x: x.topk(k, dim=-1), args.repeats)
        grouped = median_ms(lambda x=x: topk_rows(x, k), args.repeats)
        print(f"{scale:8.0f} {plain:14.1f} {grouped:13.1f} {plain / grouped:6.2f}x")

    tokens = torch.randint(0, vocab, (n, 1), generator=generator)

    def stats_before(x: torch.Tensor) -> None:
        logp = torch.log_softmax(work.copy_(x), -1, out=out)
        logp.gather(-1, tokens)
        row_dot(exp_floored(logp, out=scratch), logp)
        logp.topk(k, dim=-1)

    def stats_after(x: torch.Tensor) -> None:
        groups = topk_groups(work.copy_(x), k)
        shifted, sums = shifted_exp_(work, scratch, maxes=groups[1])
        log_sums = torch.log(sums)
        shifted.gather(-1, tokens) - log_sums
        log_sums.squeeze(-1) - row_dot(scratch, shifted) / sums.squeeze(-1)
        topk_rows(shifted, k, groups)[0] - log_sums

    print(f"\nthe teacher's statistics of one ({n}, {vocab}) tile, logits normal with a per-row scale")
    print(f"{'scales':>10} {'before ms':>10} {'after ms':>9} {'ratio':>7}")
    for low, high in ((1.0, 5.0), (5.0, 50.0)):
        scales = torch.exp(torch.empty(n, 1).uniform_(math.log(low), math.log(high), generator=generator))
        x = torch.randn(n, vocab, generator=generator) * scales
        before = median_ms(lambda x=x: stats_before(x), args.repeats)
        after = median_ms(lambda x=x: stats_after(x), args.repeats)
        print(f"{f'{low:.0f}-{high:.0f}':>10} {before:10.1f} {after:9.1f} {before / after:6.2f}x")

    loss_tile(n, vocab, generator, args.repeats)


def combination_ms(rows: int, columns: int, generator: torch.Generator, repeats: int) -> tuple[float, ...]:
    """a e_s + b e_t per row into a third tensor, median milliseconds of: a multiply and an addcmul on two
    separate tensors; `pair_combination`'s batched product on the two halves of a `TileBuffers` pair (its
    threshold set to 0 for this timing); `pair_combination` as it is, which takes one or the other."""
    buffers = TileBuffers(pairs={"second": "first"})
    first, second = (buffers.take(name, rows, columns, torch.device("cpu")) for name in ("first", "second"))
    first.normal_(generator=generator), second.normal_(generator=generator)
    first_apart, second_apart, out = first.clone(), second.clone(), torch.empty(rows, columns)
    a, b = torch.rand(rows, generator=generator), -torch.rand(rows, generator=generator)
    two = median_ms(
        lambda: torch.mul(second_apart, b[:, None], out=out).addcmul_(first_apart, a[:, None]), repeats
    )
    shipped = median_ms(lambda: pair_combination(first, second, a, b, out=out), repeats)
    threshold = tile_softmax.PAIR_COMBINATION_MIN_VALUES
    tile_softmax.PAIR_COMBINATION_MIN_VALUES = 0
    try:
        batched = median_ms(lambda: pair_combination(first, second, a, b, out=out), repeats)
    finally:
        tile_softmax.PAIR_COMBINATION_MIN_VALUES = threshold
    return two, batched, shipped


def loss_tile(n: int, vocab: int, generator: torch.Generator, repeats: int) -> None:
    cpu = torch.device("cpu")
    buffers = TileBuffers(pairs={"teacher_logits": "logits", "teacher_p": "p"})
    pair = [buffers.take(name, n, vocab, cpu) for name in ("logits", "teacher_logits", "p", "teacher_p")]
    for x in pair:
        x.copy_(torch.randn(n, vocab, generator=generator))
    apart = [torch.empty(n, vocab).copy_(x) for x in pair]
    print(f"\nthe four row-wise sums of products of two pairs of ({n}, {vocab}) float32 tensors")
    print(f"{'4 row_dot ms':>13} {'cross_dots ms':>14} {'ratio':>7}")
    dots = median_ms(lambda: [row_dot(a, b) for a in apart[2:] for b in apart[:2]], repeats)
    batched = median_ms(lambda: cross_dots((pair[2], pair[3]), (pair[0], pair[1])), repeats)
    print(f"{dots:13.1f} {batched:14.1f} {dots / batched:6.2f}x")

    # The benchmark's models: a student of logit scale 3, a teacher of scale 5-50 per row.
    z_s = torch.randn(n, vocab, generator=generator) * 3.0
    z_t = torch.randn(n, vocab, generator=generator) * torch.exp(
        torch.empty(n, 1).uniform_(1.6, 3.9, generator=generator)
    )
    coefficient = torch.rand(n, generator=generator)
    peaks = z_t.argmax(-1, keepdim=True)  # the teacher's top-1 ids, as its statistics hold them

    print("\nthe forward KL's gradient a e_s + b e_t per row from two (rows, V) float32 tensors: a multiply")
    print(
        f"  and an addcmul against one batched product (`pair_combination` from {PAIR_COMBINATION_MIN_VALUES:,} values)"
    )
    print(
        f"{'rows':>6} {'V':>8} {'mul + addcmul ms':>17} {'batched ms':>11} {'ratio':>7} {'as chosen ms':>13}"
    )
    for rows, columns in ((8, 32_768), (32, 8_192), (128, 8_192), (32, 32_768), (256, 32_768), (n, vocab)):
        two, batched, chosen = combination_ms(rows, columns, generator, repeats)
        print(f"{rows:6d} {columns:8d} {two:17.3f} {batched:11.3f} {two / batched:6.2f}x {chosen:13.3f}")

    print(f"\nthe teacher's shift of a ({n}, {vocab}) tile of logits (scale 5-50 per row)")
    print(f"{'amax ms':>8} {'gather at top-1 ms':>19} {'ratio':>7}")
    amax = median_ms(lambda: z_t.amax(-1, keepdim=True), repeats)
    gathered = median_ms(lambda: z_t.gather(-1, peaks), repeats)
    print(f"{amax:8.1f} {gathered:19.3f} {amax / gathered:6.0f}x")

    def before() -> None:
        logp_t, p_t = log_softmax_and_softmax_(apart[1].copy_(z_t), apart[3])
        logp, p = log_softmax_and_softmax_(apart[0].copy_(z_s), apart[2])
        -row_dot(p, logp), row_dot(p_t, logp_t) - row_dot(p_t, logp), row_dot(p, logp_t)
        torch.sub(p, p_t, out=p_t).mul_(coefficient[:, None])

    def after() -> None:
        teacher = softmaxed(pair[1].copy_(z_t), pair[3], peak_ids=peaks)
        student = softmaxed(pair[0].copy_(z_s), pair[2])
        _, fkl, _ = exact_kls(student, teacher)
        tile = Tile(
            tokens=None, old_logprobs=None, stats=None, teacher_logp=None, teacher=teacher, known={"fkl": fkl}
        )
        TERM_KINDS["forward_kl"].dense(student, tile, {}, coefficient, True)

    copies = median_ms(lambda: (apart[0].copy_(z_s), apart[1].copy_(z_t)), repeats)
    print(f"\none loss tile of the full-vocabulary forward KL, ({n}, {vocab}), the logits' copies subtracted")
    print(f"{'before ms':>10} {'after ms':>9} {'ratio':>7}")
    took_before, took_after = median_ms(before, repeats) - copies, median_ms(after, repeats) - copies
    print(f"{took_before:10.1f} {took_after:9.1f} {took_before / took_after:6.2f}x")


if __name__ == "__main__":
    main()
