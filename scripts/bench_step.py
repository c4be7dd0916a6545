"""Time per phase of one DistillModule training step, and the share spent outside the models.

    .venv/bin/python scripts/bench_step.py                 # tiny pair on CPU, 3 measured steps
    .venv/bin/python scripts/bench_step.py --steps 5 --objective opd --batch-size 32

Prints, per phase (rollout, teacher, old_logprobs, update), the mean seconds per rollout step and how much
of it is spent outside the models: sampling (the whole rollout phase), decoder forwards and backward passes
count as model time; everything else (objective tiles and output-layer products, teacher statistics,
diagnostics, optimizer, Python) is overhead. Target: overhead under 10% of the step.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from eopd.data import PromptDataset, PromptFormat
from eopd.models import build_causal_lm
from eopd.module import DistillModule, OptimSpec, PairSpec, RolloutSpec, UpdateSpec
from eopd.objectives import preset
from eopd.tasks.multipath import make_splits
from eopd.tasks.tokenizer import IM_END, build_tokenizer


def timed(fn, bucket: dict[str, float], key: str):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            bucket[key] += time.perf_counter() - start

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=3, help="measured rollout steps (after one warm-up)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per rollout batch")
    parser.add_argument("--mini-batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--objective", default="eopd")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    student_tok, teacher_tok = build_tokenizer(), build_tokenizer(eos_token=IM_END)
    vocab = len(student_tok)
    student = build_causal_lm(vocab_size=vocab, hidden_size=128, num_layers=4, num_heads=4, seed=0)
    teacher = build_causal_lm(vocab_size=vocab, hidden_size=256, num_layers=4, num_heads=8, seed=1)
    records = [{"prompt": p.prompt} for p in make_splits(0, 256, 0, 0)["train"]]
    data = PromptDataset(
        records,
        student_tokenizer=student_tok,
        student_format=PromptFormat(suffix="\n"),
        teacher_tokenizer=teacher_tok,
        teacher_format=PromptFormat(template="chat"),
    )
    eos, teacher_eos = student_tok.eos_token_id, teacher_tok.eos_token_id
    module = DistillModule(
        student,
        teacher,
        preset(args.objective),
        pair=PairSpec(
            vocab_size=vocab,
            pad_token_id=student_tok.pad_token_id,
            student_eos_ids=(eos,),
            teacher_eos_ids=(teacher_eos,),
            remap_end_token=(eos, teacher_eos),
        ),
        rollout=RolloutSpec(max_new_tokens=args.max_new_tokens),
        update=UpdateSpec(mini_batch_size=args.mini_batch_size),
        optim=OptimSpec(lr=1e-4),
    )
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    inside: dict[str, float] = defaultdict(float)
    module.optimizers = lambda: optimizer
    module.lr_schedulers = lambda: scheduler
    module.manual_backward = timed(lambda loss: loss.backward(), inside, "backward")
    for name, model in (("student", student), ("teacher", teacher)):
        model.model.forward = timed(model.model.forward, inside, f"{name}_forward")
    module.student.train()

    phases: dict[str, float] = defaultdict(float)
    overhead: dict[str, float] = defaultdict(float)
    tokens = 0

    def model_seconds() -> float:
        return sum(inside.values())

    for step in range(args.steps + 1):
        batch = [data[(step * args.batch_size + i) % len(data)] for i in range(args.batch_size)]
        if step == 1:  # the first step warms up allocators and kernels
            phases.clear()
            overhead.clear()
            tokens = 0
        marks = [(time.perf_counter(), model_seconds())]
        rollout, _ = module.make_rollout(batch)
        marks.append((time.perf_counter(), model_seconds()))
        teacher_side = module.score_teacher(rollout, batch)
        marks.append((time.perf_counter(), model_seconds()))
        old, _ = module.score_old_policy(rollout, teacher_side)
        marks.append((time.perf_counter(), model_seconds()))
        module.update(rollout, teacher_side, old)
        marks.append((time.perf_counter(), model_seconds()))
        for name, (t0, m0), (t1, m1) in zip(
            ("rollout", "teacher", "old_logprobs", "update"), marks, marks[1:], strict=False
        ):
            phases[name] += t1 - t0
            overhead[name] += 0.0 if name == "rollout" else (t1 - t0) - (m1 - m0)
        tokens += rollout.num_valid_tokens

    n = args.steps
    total = sum(phases.values())
    rest = sum(overhead.values())
    print(
        f"device: cpu ({torch.get_num_threads()} threads), objective {args.objective}, "
        f"{args.batch_size} prompts x <= {args.max_new_tokens} tokens, {n} measured steps"
    )
    print(f"{'phase':<16}{'s/step':>10}{'share':>9}{'overhead s':>12}")
    for name, seconds in phases.items():
        print(f"{name:<16}{seconds / n:>10.3f}{seconds / total:>9.1%}{overhead[name] / n:>12.3f}")
    print(
        f"{'total':<16}{total / n:>10.3f}{1:>9.0%}{rest / n:>12.3f}   ({tokens / total:.0f} response tokens/s)"
    )
    verdict = "meets" if rest / total < 0.10 else "misses"
    print(
        f"outside forward/backward/sampling: {rest / n:.3f} s/step = {rest / total:.1%} of the step "
        f"({verdict} the 10% target)"
    )


if __name__ == "__main__":
    main()
