"""This tree's sampler against another tree's, alternating in one process on the tiny pair of bench_vs_trl.

    git archive <commit> eopd | tar -x -C /tmp/base
    .venv/bin/python scripts/bench_sampler_ab.py --baseline /tmp/base                 # sampling alone
    .venv/bin/python scripts/bench_sampler_ab.py --baseline /tmp/base --mode step     # whole training steps
    ATEN_CPU_CAPABILITY=default .venv/bin/python scripts/bench_sampler_ab.py --baseline /tmp/base

On a shared machine a process's speed moves by a third from one process to the next, so two codes timed
in separate processes (`scripts/bench_vs_trl.py --baseline`) are ranked by the host as much as by the
code. Here one process loads both samplers: `eopd.rollout` and `eopd.decode_step` of this tree and of
`--baseline` (the baseline's modules import the rest of eopd from this tree), and draws which one runs
at random before each timing, so both see the same host at the same moments.

`--mode sample` times `sample` on the tiny pair's prompts (8 x <= 32 new tokens, seed per timing) and
checks that both samplers return the same tokens and log-probs bitwise. `--mode step` trains the
`DistillModule` of `scripts/bench_vs_trl.py` (objective fkl, one mini-batch per step) with the module's
sampler swapped per step, and prints the step's phases (`time/*` of the step logs) per sampler. Printed:
medians (and the median of the per-pair ratios, sample mode). Nothing here is a test.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import statistics
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def load_sampler(tree: str) -> types.ModuleType:
    """`eopd.rollout` of another source tree, its decoding step that tree's too, under private names."""

    def load(name: str, relative: str) -> types.ModuleType:
        path = os.path.join(tree, "eopd", relative)
        if not os.path.exists(path):
            raise SystemExit(f"--baseline {tree}: no {path}; extract a tree with `git archive <commit> eopd`")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    rollout = load("baseline_rollout", "rollout.py")
    if hasattr(rollout, "direct_decode_step"):
        rollout.direct_decode_step = load("baseline_decode_step", "decode_step.py").direct_decode_step
    return rollout


def sample_mode(samplers: dict, timings: int, seed: int) -> None:
    import bench_vs_trl
    import torch

    size = bench_vs_trl.SIZES["tiny"]
    tokenizer, student, _ = bench_vs_trl.build_pair(size)
    prompts = [tokenizer(t)["input_ids"] for t in bench_vs_trl.prompt_texts(size.batch_size * timings)]
    times: dict[str, list[float]] = {name: [] for name in samplers}
    order = random.Random(seed)
    for i in range(timings):
        batch = prompts[i * size.batch_size : (i + 1) * size.batch_size]
        out = {}
        for name in order.sample(list(samplers), len(samplers)):
            start = time.perf_counter()
            out[name] = samplers[name].sample(
                student,
                batch,
                max_new_tokens=size.max_new_tokens,
                eos_token_ids=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                generator=torch.Generator().manual_seed(seed + i),
            )
            times[name].append(time.perf_counter() - start)
        a, b = out["baseline"], out["this tree"]
        if not (
            torch.equal(a.input_ids, b.input_ids) and torch.equal(a.sampler_logprobs, b.sampler_logprobs)
        ):
            raise SystemExit(f"timing {i}: the two samplers drew different tokens or log-probs")
    warm = 3
    for name, values in times.items():
        print(f"{name:10s} median {1e3 * statistics.median(values[warm:]):.1f} ms over {len(values) - warm}")
    ratios = [n / o for n, o in zip(times["this tree"][warm:], times["baseline"][warm:], strict=True)]
    print(f"this tree / baseline, median of per-pair ratios: {statistics.median(ratios):.3f}")
    print("tokens and log-probs bitwise equal in every timing")


def step_mode(samplers: dict, steps: int, seed: int) -> None:
    import bench_vs_trl
    import lightning as L

    import eopd.rollout_engines

    size = bench_vs_trl.SIZES["tiny"]
    tokenizer, student, teacher = bench_vs_trl.build_pair(size)
    module = bench_vs_trl.eopd_module(size, tokenizer, student, teacher, seed)
    order = random.Random(seed)
    rows: list[tuple[str, float, dict]] = []

    class Swap(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.name = order.choice(list(samplers))
            eopd.rollout_engines.sample = samplers[self.name].sample  # what HFEngine.generate calls
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            rows.append((self.name, time.perf_counter() - self.start, dict(pl_module.last_logs)))

    bench_vs_trl.fit_eopd(module, tokenizer, size, steps, [Swap()])
    phases = ("time/rollout", "time/teacher", "time/update")
    print(f"{'sampler':10s} {'steps':>5s} {'step':>9s} " + " ".join(f"{p[5:]:>9s}" for p in phases))
    for name in samplers:
        mine = [row for row in rows[3:] if row[0] == name]  # after 3 warm-up steps
        if not mine:
            continue
        cells = [statistics.median(row[1] for row in mine)]
        cells += [statistics.median(float(row[2][p]) for row in mine) for p in phases]
        print(f"{name:10s} {len(mine):5d} " + " ".join(f"{1e3 * c:7.1f}ms" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline", required=True, help="a directory holding another eopd package")
    parser.add_argument("--mode", choices=("sample", "step"), default="sample")
    parser.add_argument("--timings", type=int, default=40, help="sample mode: timings per sampler")
    parser.add_argument("--steps", type=int, default=60, help="step mode: training steps in all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    import eopd.rollout

    torch.set_num_threads(args.threads)
    samplers = {"baseline": load_sampler(args.baseline), "this tree": eopd.rollout}
    print(f"baseline: {os.path.abspath(args.baseline)}; {args.threads} threads; torch {torch.__version__}")
    if args.mode == "sample":
        sample_mode(samplers, args.timings, args.seed)
    else:
        step_mode(samplers, args.steps, args.seed)


if __name__ == "__main__":
    main()
