"""Time and peak memory of one forward+backward of the EOPD and forward-KL losses, naive against fused.

Run:
    .venv/bin/python scripts/bench_objectives.py                       # small, then 2048 x 1024 x 151,936
    .venv/bin/python scripts/bench_objectives.py --sizes small         # seconds, skips the large size
    .venv/bin/python scripts/bench_objectives.py --chunk-size 256 512 1024 2048
    .venv/bin/python scripts/bench_objectives.py --sizes large --no-check --rounds 3   # fused vs bare, paired
    .venv/bin/python scripts/bench_objectives.py --dtype bfloat16 --device cuda

The naive variant materialises both models' full logits (N, V) and writes the loss straight from its
definition (PAPER.md section 2); the fused variant is the project's path: `teacher_token_stats` on the
teacher's `LinearLogits`, then `preset(...)` on the student's `LinearLogits`, tile by tile. Every
measurement runs in a fresh process, so one variant's peak memory cannot hide behind another's; peak MB
is the growth above the memory held once the inputs exist (CPU: VmHWM after resetting it through
/proc/self/clear_refs; CUDA: max_memory_allocated). Before timing, a separate process runs both variants
on the same inputs and prints how far their loss and the gradients of the student's hidden states and
output weight are apart. The bare variant times only the matrix products the fused path makes, tile by
tile over the valid positions (the teacher's logits for its statistics, the student's logits, for fkl
the teacher's logits again in the loss tiles, then the two products of the backward pass with a
stand-in gradient), with no softmax, loss or bookkeeping: the floor the fused path is measured against.
`--rounds N` times the bare and fused variants N times each, alternating (bare, fused, fused, bare, ...),
and reports time/bare as the median of each round's ratio: the two sides of a round run next to each
other, so a machine whose speed drifts over minutes moves both. `--keep-freed-memory` runs every
variant with the allocator setting of `eopd.train
keep_freed_memory=true` (`eopd/allocator.py`). Wall time on a shared machine is noisy: the cpu-seconds
column and the printed load average help judge it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from multiprocessing import get_context

import torch
from torch import Tensor

from eopd.allocator import keep_freed_memory, return_freed_memory
from eopd.objectives import LinearLogits, preset, teacher_token_stats
from eopd.objectives.fused import TileBuffers, source_tile


@dataclass(frozen=True)
class Size:
    tokens: int
    hidden: int
    vocab: int


SIZES = {"small": Size(256, 64, 1000), "large": Size(2048, 1024, 151_936)}  # 151,936 = Qwen3's vocabulary
SEQUENCES = 8  # the tokens form (8, tokens / 8) response positions, like a micro-batch of responses
OBJECTIVES = ("eopd", "fkl")
DEFAULT_CHUNK = preset("eopd").chunk_size
TOP_K = 16
TARGET_MEMORY_RATIO = 0.25  # fused peak / naive peak at the large size
TARGET_TIME_RATIO = 1.2  # fused time / naive time at the large size
TARGET_BARE_RATIO = 1.2  # fused time / the time of its bare matrix products at the large size


@dataclass(frozen=True)
class Job:
    """One measurement, run in its own process."""

    size: str
    objective: str
    variant: str  # "naive", "fused", "bare" (the fused path's matrix products alone), "check" (naive and
    # fused, compared) or "rollout" (makes tokens and old log-probs)
    chunk_size: int
    dtype: str
    device: str
    repeats: int
    seed: int
    threads: int
    rollout: tuple | None = None  # (tokens, old_logprobs, lengths) as lists, from the "rollout" job
    keep_freed_memory: bool = False  # the C allocator keeps freed memory (eopd/allocator.py)


@dataclass
class Inputs:
    hidden_s: Tensor  # (B, T, H), requires grad
    weight_s: Tensor  # (V, H), requires grad
    hidden_t: Tensor  # (B, T, H)
    weight_t: Tensor  # (V, H)
    tokens: Tensor | None = None  # (B, T)
    mask: Tensor | None = None  # (B, T) bool
    old_logprobs: Tensor | None = None  # (B, T)


# ---- inputs ---------------------------------------------------------------------------------------


def make_models(job: Job) -> Inputs:
    """Seeded hidden states and output weights for both models, on the job's device and dtype."""
    size = SIZES[job.size]
    generator = torch.Generator().manual_seed(job.seed)
    shape = (SEQUENCES, size.tokens // SEQUENCES, size.hidden)
    dtype = getattr(torch, job.dtype)

    def randn(*dims: int, scale: float | Tensor = 1.0) -> Tensor:
        return (torch.randn(dims, generator=generator) * scale).to(job.device, dtype)

    # The teacher's logit scale varies per position (log-uniform in [5, 50] standard deviations), so its
    # entropy spans confident and uncertain tokens and the gate H_t >= 0.8 opens on some of them only.
    teacher_scale = torch.exp(torch.empty(shape[:2]).uniform_(1.6, 3.9, generator=generator))[..., None]
    return Inputs(
        hidden_s=randn(*shape, scale=3.0).requires_grad_(),
        weight_s=randn(size.vocab, size.hidden, scale=size.hidden**-0.5).requires_grad_(),
        hidden_t=randn(*shape, scale=teacher_scale),
        weight_t=randn(size.vocab, size.hidden, scale=size.hidden**-0.5),
    )


@torch.no_grad()
def make_rollout(job: Job) -> tuple:
    """Tokens sampled from the student, its log-probs before the update, and response lengths.

    old_logprobs are the student's log-probs plus N(0, 0.1) noise: they stand for the student before the
    rollout batch's earlier mini-batch updates, so that some ratios leave [0.8, 1.2] and the clip acts.
    """
    models = make_models(job)
    generator = torch.Generator().manual_seed(job.seed + 1)
    hidden = models.hidden_s.reshape(-1, models.hidden_s.shape[-1])
    tokens, logprobs = [], []
    for start in range(0, hidden.shape[0], 256):  # chunks of positions keep this setup's memory small
        logp = torch.log_softmax((hidden[start : start + 256] @ models.weight_s.T).float(), -1).cpu()
        sampled = torch.multinomial(logp.exp(), 1, generator=generator)  # (n, 1)
        tokens.append(sampled.squeeze(-1))
        logprobs.append(logp.gather(-1, sampled).squeeze(-1))
    old_logprobs = torch.cat(logprobs) + 0.1 * torch.randn(hidden.shape[0], generator=generator)
    length = hidden.shape[0] // SEQUENCES
    lengths = torch.randint(length // 2, length + 1, (SEQUENCES,), generator=generator)
    return torch.cat(tokens).tolist(), old_logprobs.tolist(), lengths.tolist()


def make_inputs(job: Job) -> Inputs:
    inputs = make_models(job)
    tokens, old_logprobs, lengths = job.rollout
    shape = inputs.hidden_s.shape[:2]
    inputs.tokens = torch.tensor(tokens, device=job.device).reshape(shape)
    inputs.old_logprobs = torch.tensor(old_logprobs, device=job.device).reshape(shape)
    positions = torch.arange(shape[1], device=job.device)
    inputs.mask = positions[None, :] < torch.tensor(lengths, device=job.device)[:, None]  # right padding
    return inputs


# ---- the two implementations -----------------------------------------------------------------------


def naive_loss(
    objective: str, x: Inputs, *, tau: float = 0.8, alpha: float = 1.0, eps: float = 0.2
) -> Tensor:
    """The loss written from its definition, with both models' full logits in memory."""
    logp_s = torch.log_softmax((x.hidden_s @ x.weight_s.T).float(), dim=-1)  # (B, T, V)
    with torch.no_grad():
        logp_t = torch.log_softmax((x.hidden_t @ x.weight_t.T).float(), dim=-1)  # (B, T, V)
    mask = x.mask.float()
    if objective == "fkl":
        fkl = (logp_t.exp() * (logp_t - logp_s)).sum(-1)  # KL(teacher || student), (B, T)
        return (fkl * mask).sum() / mask.sum()
    with torch.no_grad():
        entropy_t = -(logp_t.exp() * logp_t).sum(-1)  # (B, T)
        topk_logp_t, topk_index = logp_t.topk(TOP_K, dim=-1)  # (B, T, k)
        token_logp_t = logp_t.gather(-1, x.tokens[..., None]).squeeze(-1)
    token_logp_s = logp_s.gather(-1, x.tokens[..., None]).squeeze(-1)
    ratio = torch.exp(token_logp_s - x.old_logprobs)
    advantage = token_logp_t - x.old_logprobs
    ppo = torch.maximum(-ratio * advantage, -ratio.clamp(1 - eps, 1 + eps) * advantage)
    log_q = torch.log_softmax(topk_logp_t, dim=-1)  # the teacher renormalised over its top-k
    fkl = (log_q.exp() * (log_q - logp_s.gather(-1, topk_index))).sum(-1)
    gate = (entropy_t >= tau).float()
    return ((ppo + alpha * gate * fkl) * mask).sum() / mask.sum()


def fused_loss(objective: str, x: Inputs, chunk_size: int) -> tuple[Tensor, dict[str, float]]:
    """The project's path: teacher statistics, then the preset on `LinearLogits`, tile by tile."""
    loss_fn = preset(objective, top_k=TOP_K, chunk_size=chunk_size)
    student = LinearLogits(x.hidden_s, x.weight_s)
    teacher = LinearLogits(x.hidden_t, x.weight_t)
    if objective == "fkl":
        loss, metrics = loss_fn(student=student, tokens=x.tokens, mask=x.mask, teacher=teacher)
    else:
        stats = teacher_token_stats(teacher, x.tokens, k=TOP_K, chunk_size=chunk_size, mask=x.mask)
        loss, metrics = loss_fn(
            student=student, tokens=x.tokens, mask=x.mask, teacher_stats=stats, old_logprobs=x.old_logprobs
        )
    return loss, metrics.means()


@torch.no_grad()
def bare_products(objective: str, x: Inputs, chunk_size: int) -> None:
    """The fused path's matrix products and nothing else, tile by tile over the valid positions.

    Per tile: teacher logits h_t W_t^T (n, V) for the teacher's statistics; student logits h_s W_s^T;
    for fkl the teacher's logits once more (its loss tiles read the full distribution, which is not kept
    between the two passes); then what the backward pass multiplies, G W_s (n, H) and G^T h_s (V, H)
    accumulated, with the student logits standing in for the gradient G of the logits. No softmax, no
    loss, no gather, no top-k.
    """
    hidden_s, hidden_t = x.hidden_s[x.mask], x.hidden_t[x.mask]  # (N, H)
    student, teacher = LinearLogits(hidden_s, x.weight_s), LinearLogits(hidden_t, x.weight_t)
    # Like the fused path, each pass writes its tiles into buffers reused from tile to tile (TileBuffers).
    buffers = TileBuffers()
    for start in range(0, hidden_t.shape[0], chunk_size):  # the statistics pass
        source_tile(teacher, start, min(start + chunk_size, hidden_t.shape[0]), buffers)  # (n, V), dropped
    buffers = TileBuffers()
    grad_hidden = torch.empty_like(hidden_s)
    grad_weight = torch.empty_like(x.weight_s)  # written by the first tile's product, as in the fused path
    for start in range(0, hidden_s.shape[0], chunk_size):
        end = min(start + chunk_size, hidden_s.shape[0])
        logits_s = source_tile(student, start, end, buffers, "s")  # (n, V)
        if objective == "fkl":  # the loss tile's teacher logits, dropped
            source_tile(teacher, start, end, buffers, "t")
        torch.mm(logits_s, x.weight_s, out=grad_hidden[start:end])
        if start == 0:
            torch.mm(logits_s.T, hidden_s[start:end], out=grad_weight)
        else:
            grad_weight.addmm_(logits_s.T, hidden_s[start:end])


# ---- measurement (each call runs in a fresh process) ---------------------------------------------


class PeakMemory:
    """Peak memory growth in MB above the level at `start()`: CUDA allocator stats, or VmHWM on Linux."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
            return
        try:  # "5" resets the peak resident set size to the current one (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        self.baseline = _proc_status_kb("VmRSS") * 1024
        if _proc_status_kb("VmHWM") * 1024 > self.baseline + 2**20:
            print("warning: could not reset VmHWM; peak memory includes setup", file=sys.stderr)

    def peak_mb(self) -> float:
        if self.cuda:
            return (torch.cuda.max_memory_allocated() - self.baseline) / 2**20
        return (_proc_status_kb("VmHWM") * 1024 - self.baseline) / 2**20


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status: peak memory on CPU needs Linux")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_job(job: Job) -> dict:
    """Entry point of the worker process: one rollout, one timed variant, or one agreement check."""
    torch.set_num_threads(job.threads)
    torch.manual_seed(job.seed)
    if job.keep_freed_memory:  # every variant alike: eopd.train keep_freed_memory=true
        keep_freed_memory()
    if job.variant == "rollout":
        return {"rollout": make_rollout(job)}
    x = make_inputs(job)
    if job.variant == "check":
        return check_agreement(job, x)

    def step() -> None:
        x.hidden_s.grad = x.weight_s.grad = None
        if job.variant == "bare":
            bare_products(job.objective, x, job.chunk_size)
            return
        if job.variant == "naive":
            loss = naive_loss(job.objective, x)
        else:
            loss, _ = fused_loss(job.objective, x, job.chunk_size)
        loss.backward()

    if job.device.startswith("cuda") or job.size == "small":
        # Warm-up: the first call creates kernels, cuBLAS handles and thread pools; at the small size
        # that one-time cost would dominate. At the large size on CPU it is negligible and a call is slow.
        step()
        x.hidden_s.grad = x.weight_s.grad = None
    if job.keep_freed_memory:
        return_freed_memory()  # the kept heap would otherwise hide the variant's own growth
    memory = PeakMemory(job.device)
    memory.start()
    times, cpu_times = [], []
    for _ in range(job.repeats):
        _sync(job.device)
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        _sync(job.device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return {
        "time_s": statistics.median(times),
        "cpu_s": statistics.median(cpu_times),
        "peak_mb": memory.peak_mb(),
    }


def check_agreement(job: Job, x: Inputs) -> dict:
    """Loss and student gradients of both variants on the same inputs, and their largest differences."""
    naive = naive_loss(job.objective, x)
    naive.backward()
    naive_grads = (x.hidden_s.grad, x.weight_s.grad)
    x.hidden_s.grad = x.weight_s.grad = None
    fused, metrics = fused_loss(job.objective, x, job.chunk_size)
    fused.backward()
    result = {
        "loss_naive": naive.item(),
        "loss_fused": fused.item(),
        "gate_fraction": metrics.get("gate/fraction", 0.0),
    }
    for name, reference, grad in zip(
        ("hidden_s", "weight_s"), naive_grads, (x.hidden_s.grad, x.weight_s.grad), strict=True
    ):
        result[f"grad_{name}_max_abs"] = float(reference.abs().max())
        result[f"grad_{name}_max_diff"] = float((grad.float() - reference.float()).abs().max())
    return result


def in_fresh_process(job: Job) -> dict:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(run_job, job).result()


# ---- report -----------------------------------------------------------------------------------------


@dataclass
class Row:
    size: str
    objective: str
    variant: str
    chunk_size: int | None
    result: dict  # time_s, cpu_s, peak_mb
    naive: dict  # the naive result of the same size and objective
    bare: dict | None = None  # the bare products' result of the same size, objective and chunk
    paired: list[float] | None = None  # fused / bare time of each round, the two timed side by side

    def ratio(self, key: str) -> float:
        return self.result[key] / max(self.naive[key], 1e-12)

    def bare_ratio(self) -> float | None:
        if self.paired:
            return statistics.median(self.paired)
        return None if self.bare is None else self.result["time_s"] / max(self.bare["time_s"], 1e-12)


def median_result(results: list[dict]) -> dict:
    """Each field's median over rounds."""
    return {key: statistics.median(r[key] for r in results) for key in results[0]}


def print_table(rows: list[Row]) -> None:
    header = (
        f"{'size':<28} {'objective':<9} {'variant':<7} {'chunk':>5} {'time s':>8} {'cpu s':>8} "
        f"{'peak MB':>9} {'time/naive':>10} {'cpu/naive':>9} {'mem/naive':>9} {'time/bare':>9}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        size = SIZES[row.size]
        label = f"{row.size} {size.tokens}x{size.hidden}x{size.vocab}"
        print(
            f"{label:<28} {row.objective:<9} {row.variant:<7} {row.chunk_size or '-':>5} "
            f"{row.result['time_s']:>8.3f} {row.result['cpu_s']:>8.3f} {row.result['peak_mb']:>9.1f} "
            f"{row.ratio('time_s'):>9.2f}x {row.ratio('cpu_s'):>8.2f}x {row.ratio('peak_mb'):>8.3f}x"
            + (f" {row.bare_ratio():>8.2f}x" if row.bare_ratio() is not None else f" {'-':>9}")
        )


def agrees(check: dict, dtype: str) -> bool:
    """Relative agreement of loss and gradients: float32 to 1e-4, bfloat16 to 2e-2."""
    tolerance = 1e-4 if dtype == "float32" else 2e-2
    loss_scale = max(abs(check["loss_naive"]), 1e-6)
    loss_ok = abs(check["loss_fused"] - check["loss_naive"]) <= tolerance * loss_scale
    grads_ok = all(
        check[f"grad_{name}_max_diff"] <= tolerance * max(check[f"grad_{name}_max_abs"], 1e-12)
        for name in ("hidden_s", "weight_s")
    )
    return loss_ok and grads_ok


def print_checks(checks: list[tuple[str, str, dict]], dtype: str) -> None:
    print("\nfused against naive: max abs difference (relative to the naive value's max abs)")
    for size, objective, c in checks:
        parts = [f"loss {c['loss_naive']:.6f} vs {c['loss_fused']:.6f}"]
        for name in ("hidden_s", "weight_s"):
            diff = c[f"grad_{name}_max_diff"]
            parts.append(f"grad {name} {diff:.2e} ({diff / max(c[f'grad_{name}_max_abs'], 1e-30):.1e})")
        if objective != "fkl":
            parts.append(f"gate open on {c['gate_fraction']:.0%} of tokens")
        parts.append("agree" if agrees(c, dtype) else "DISAGREE: a bug in the fused path")
        print(f"  {size:<6} {objective:<5} " + "; ".join(parts))


def print_targets(rows: list[Row]) -> None:
    large = [row for row in rows if row.size == "large" and row.variant == "fused"]
    if not large:
        return
    print(
        f"\ntargets at the large size: peak <= {TARGET_MEMORY_RATIO}x naive, time <= {TARGET_TIME_RATIO}x naive, "
        f"time <= {TARGET_BARE_RATIO}x its bare matrix products"
    )
    for row in large:
        memory, wall, bare = row.ratio("peak_mb"), row.ratio("time_s"), row.bare_ratio()
        line = (
            f"  {row.objective:<5} chunk {row.chunk_size:>5}: "
            f"memory {memory:.3f}x {'met' if memory <= TARGET_MEMORY_RATIO else 'MISSED'}, "
            f"time {wall:.2f}x {'met' if wall <= TARGET_TIME_RATIO else 'MISSED'}"
        )
        if bare is not None:
            line += (
                f", against the bare products {bare:.2f}x {'met' if bare <= TARGET_BARE_RATIO else 'MISSED'}"
            )
            if row.paired and len(row.paired) > 1:
                line += f" (median of {len(row.paired)} rounds, {min(row.paired):.2f}-{max(row.paired):.2f})"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES))
    parser.add_argument(
        "--chunk-size", nargs="+", type=int, default=[DEFAULT_CHUNK], help="positions per tile (fused)"
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="hidden/weights")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default: 5 small, 1 large)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads (default: all cores)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="bare/fused processes per chunk size, alternating; time/bare is the median of the rounds' ratios",
    )
    parser.add_argument("--no-check", action="store_true", help="skip the naive/fused agreement check")
    parser.add_argument(
        "--keep-freed-memory", action="store_true", help="every variant: eopd.train keep_freed_memory=true"
    )
    args = parser.parse_args()

    print(
        f"device {args.device}, dtype {args.dtype}, {args.threads} threads, top-k {TOP_K}, seed {args.seed}"
    )
    # On a shared machine other processes steal cores: the load average says how much to trust wall time.
    print(f"load average at start: {os.getloadavg()[0]:.1f}")
    rows: list[Row] = []
    checks: list[tuple[str, str, dict]] = []
    for size in args.sizes:
        repeats = args.repeats or (5 if size == "small" else 1)
        base = Job(
            size, "", "rollout", DEFAULT_CHUNK, args.dtype, args.device, repeats, args.seed, args.threads,
            keep_freed_memory=args.keep_freed_memory,
        )  # fmt: skip
        base = replace(base, rollout=in_fresh_process(base)["rollout"])
        # Both variants see the same right-padded batch; the naive one computes logits at padding too.
        print(f"{size}: {sum(base.rollout[2])} of {SIZES[size].tokens} positions are valid response tokens")
        for objective in args.objectives:
            job = replace(base, objective=objective)
            if not args.no_check:
                # The smallest chunk size splits the batch into the most tiles: the strictest comparison.
                check_job = replace(job, variant="check", chunk_size=min(args.chunk_size))
                checks.append((size, objective, in_fresh_process(check_job)))
                _progress(f"check {size} {objective}: {checks[-1][2]}")
            naive = in_fresh_process(replace(job, variant="naive"))
            rows.append(Row(size, objective, "naive", None, naive, naive))
            _progress(f"{size} {objective} naive: {naive}")
            for chunk in args.chunk_size:
                # Bare and fused alternate (bare, fused, fused, bare, ...), each in a fresh process, so
                # that each round's ratio compares two runs next to each other in time.
                runs: dict[str, list[dict]] = {"bare": [], "fused": []}
                for index in range(args.rounds):
                    for variant in ("bare", "fused") if index % 2 == 0 else ("fused", "bare"):
                        result = in_fresh_process(replace(job, variant=variant, chunk_size=chunk))
                        runs[variant].append(result)
                        _progress(f"{size} {objective} {variant} chunk {chunk} round {index}: {result}")
                paired = [
                    f["time_s"] / max(b["time_s"], 1e-12)
                    for b, f in zip(runs["bare"], runs["fused"], strict=True)
                ]
                bare, fused = median_result(runs["bare"]), median_result(runs["fused"])
                rows.append(Row(size, objective, "bare", chunk, bare, naive))
                rows.append(Row(size, objective, "fused", chunk, fused, naive, bare, paired))
    print(f"load average at end: {os.getloadavg()[0]:.1f}\n")
    print_table(rows)
    if checks:
        print_checks(checks, args.dtype)
    print_targets(rows)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
