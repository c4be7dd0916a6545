"""How much of the word-problem task the real pair's teacher solves, at a difficulty and temperature.

    .venv/bin/python scripts/calibrate_real_task.py                                  # experiment=real's settings
    .venv/bin/python scripts/calibrate_real_task.py data.two_step_fraction=0.5 rollout.temperature=0.7

Composes the training config of experiment=real with the given overrides, samples the teacher
(SmolLM2-135M-Instruct, converted from its GGUF file if it is not yet) `--samples` times on `--problems`
validation prompts, and prints its Avg@n and Pass@n, its entropy and high-entropy fraction on its own
samples, the response length and the truncated share, and Avg@n by kind of problem (one or two steps;
a total over kinds, gains only, or with a loss). The settings in conf/data/word_arithmetic.yaml and
conf/experiment/real.yaml were chosen with it (docs/real.md).
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_pruning import load_teacher  # noqa: E402


def kind(record: dict) -> str:
    prompt = record["prompt"]
    shape = (
        "total"
        if "in total" in prompt
        else ("loss" if " gives " in prompt or " loses " in prompt else "gain")
    )
    return f"{record['steps']}-step {shape}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--problems", type=int, default=32, help="validation prompts")
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data.max_operand=9")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from eopd.data import PromptFormat, load_records
    from eopd.evaluation import GRADERS, EvalSpec, ModelSide, evaluate
    from eopd.plan import plain

    cfg, tokenizer, teacher = load_teacher(args.overrides)
    records = load_records(plain(cfg.data))["val"][: args.problems]
    spec = EvalSpec(
        n_samples=args.samples, temperature=cfg.rollout.temperature, max_new_tokens=cfg.rollout.max_new_tokens,
        batch_size=16, tau=cfg.eval.tau,
    )  # fmt: skip
    side = ModelSide(
        teacher, tokenizer, PromptFormat(**plain(cfg.pair.teacher_format)), (tokenizer.eos_token_id,)
    )
    start = time.perf_counter()
    result = evaluate(side, records, GRADERS[cfg.eval.grader](), spec, vocab_size=len(tokenizer))
    n, m = args.samples, result.metrics
    print(
        f"teacher on {len(records)} validation prompts x {n} samples, temperature {spec.temperature}, up to "
        f"{spec.max_new_tokens} new tokens ({time.perf_counter() - start:.0f} s); overrides: {args.overrides}"
    )
    print(
        f"avg@{n} {m[f'avg@{n}']:.3f}  pass@{n} {m[f'pass@{n}']:.3f}  entropy {m['entropy/student']:.3f}  "
        f"high-entropy fraction {m['entropy/student_high_frac']:.3f}  length {m['len_mean']:.1f}  "
        f"truncated {m['truncated_frac']:.3f}"
    )
    by_kind = collections.defaultdict(list)
    for record, correct in zip(records, result.problems.correct, strict=True):
        by_kind[kind(record)].append(correct / n)
    for name, values in sorted(by_kind.items()):
        print(f"  {name:<14} {len(values):>3} problems  avg@{n} {sum(values) / len(values):.3f}")


if __name__ == "__main__":
    main()
