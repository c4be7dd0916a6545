"""Time per phase of one DistillModule training step, tokens per second, and the share outside the models.

    .venv/bin/python scripts/bench_step.py                 # tiny pair on CPU, 3 measured steps
    .venv/bin/python scripts/bench_step.py --steps 5 --objective opd --batch-size 32
    python scripts/bench_step.py --student Qwen/Qwen3-0.6B-Base --teacher Qwen/Qwen3-1.7B \
        --batch-size 64 --mini-batch-size 16 --max-new-tokens 512    # a real pair, bf16 on the GPU

The device is CUDA when one is visible (--device cpu forces the CPU); weights are in --dtype (bfloat16 on
CUDA, float32 on the CPU unless given). Every phase boundary and every timed model call synchronises CUDA,
so the phases are honest at the price of some overlap.

Prints the device, then per phase (rollout, teacher, old_logprobs, update, sync: the weight push to a vLLM
engine) the mean seconds per rollout step and how much of it is spent outside the models: sampling (the
whole rollout phase), the weight push, decoder forwards and backward passes count as model time; everything else (objective tiles and output-layer products, teacher statistics,
diagnostics, optimizer, Python) is overhead. Target: overhead under 10% of the step.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from eopd.data import PromptDataset, PromptFormat
from eopd.models import DTYPES, build_causal_lm
from eopd.module import DistillModule
from eopd.objectives import preset
from eopd.pairs import assemble_pair
from eopd.rollout_engines import VLLMEngine, VLLMOptions, save_engine_copy
from eopd.specs import OptimSpec, RolloutSpec, UpdateSpec
from eopd.tasks.multipath import make_splits
from eopd.tasks.tokenizer import IM_END, build_tokenizer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, bucket: dict[str, float], key: str, device: torch.device):
    def wrapper(*args, **kwargs):
        sync(device)
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            sync(device)
            bucket[key] += time.perf_counter() - start

    return wrapper


def tiny_pair():
    """The project's character tokenizer and a random 128-wide student, 256-wide teacher."""
    student_tok, teacher_tok = build_tokenizer(), build_tokenizer(eos_token=IM_END)
    vocab = len(student_tok)
    student = build_causal_lm(vocab_size=vocab, hidden_size=128, num_layers=4, num_heads=4, seed=0)
    teacher = build_causal_lm(vocab_size=vocab, hidden_size=256, num_layers=4, num_heads=8, seed=1)
    return student, teacher, student_tok, teacher_tok, vocab, "tiny random pair"


def loaded_pair(student_path: str, teacher_path: str, dtype: torch.dtype):
    """A Hugging Face pair (local directories or hub ids) sharing a vocabulary."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    student_tok, teacher_tok = (
        AutoTokenizer.from_pretrained(student_path),
        AutoTokenizer.from_pretrained(teacher_path),
    )
    vocab = len(student_tok)  # assemble_pair checks that the two share it
    student = AutoModelForCausalLM.from_pretrained(student_path, dtype=dtype)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=dtype)
    return student, teacher, student_tok, teacher_tok, vocab, f"{student_path} <- {teacher_path}"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"cpu {platform.machine()} ({torch.get_num_threads()} threads)"


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
    parser.add_argument("--device", default="auto", help="auto (CUDA when visible), cuda or cpu")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="weights (default: see above)")
    parser.add_argument("--student", default=None, help="student directory or hub id (default: tiny pair)")
    parser.add_argument("--teacher", default=None, help="teacher directory or hub id (with --student)")
    parser.add_argument("--engine", default="hf", choices=["hf", "vllm"], help="rollout engine (vllm: GPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if (args.student is None) != (args.teacher is None):
        parser.error("give both --student and --teacher, or neither (the tiny pair)")
    if args.engine == "vllm" and args.student is None:
        parser.error("--engine vllm loads the student from --student")

    if args.student is None:
        student, teacher, student_tok, teacher_tok, vocab, pair_name = tiny_pair()
    else:
        student, teacher, student_tok, teacher_tok, vocab, pair_name = loaded_pair(
            args.student, args.teacher, DTYPES[dtype_name]
        )
    student, teacher = student.to(device, DTYPES[dtype_name]), teacher.to(device, DTYPES[dtype_name])
    records = [{"prompt": p.prompt} for p in make_splits(0, 256, 0, 0)["train"]]
    data = PromptDataset(
        records,
        student_tokenizer=student_tok,
        student_format=PromptFormat(suffix="\n"),
        teacher_tokenizer=teacher_tok,
        teacher_format=PromptFormat(template="chat", enable_thinking=False),
    )
    engine = None
    if args.engine == "vllm":  # vLLM loads a copy of the student with exactly the shared vocabulary
        copy = save_engine_copy(student, Path(tempfile.mkdtemp(prefix="eopd_engine_")), vocab)
        engine = VLLMEngine(copy, vocab_size=vocab, options=VLLMOptions(dtype=dtype_name))
    module = DistillModule(
        student,
        teacher,
        preset(args.objective),
        pair=assemble_pair(student_tok, teacher_tok),  # the tokenizers' own end tokens, remapped
        rollout=RolloutSpec(max_new_tokens=args.max_new_tokens, engine=args.engine),
        update=UpdateSpec(mini_batch_size=args.mini_batch_size),
        optim=OptimSpec(lr=1e-4),
        engine=engine,
    )
    module.to(device)  # the module's device is where rollouts are drawn
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    inside: dict[str, float] = defaultdict(float)
    module.optimizers = lambda: optimizer
    module.lr_schedulers = lambda: scheduler
    module.manual_backward = timed(lambda loss: loss.backward(), inside, "backward", device)
    for name, model in (("student", student), ("teacher", teacher)):
        model.model.forward = timed(model.model.forward, inside, f"{name}_forward", device)
    module.student.train()

    phases: dict[str, float] = defaultdict(float)
    overhead: dict[str, float] = defaultdict(float)
    tokens = 0

    def model_seconds() -> float:
        return sum(inside.values())

    def mark(marks: list[tuple[float, float]]) -> None:
        sync(device)
        marks.append((time.perf_counter(), model_seconds()))

    for step in range(args.steps + 1):
        batch = [data[(step * args.batch_size + i) % len(data)] for i in range(args.batch_size)]
        if step == 1:  # the first step warms up allocators and kernels
            phases.clear()
            overhead.clear()
            tokens = 0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
        marks: list[tuple[float, float]] = []
        mark(marks)
        rollout, _ = module.make_rollout(batch)
        mark(marks)
        teacher_side = module.score_teacher(rollout, batch)
        mark(marks)
        old, diagnostics, reused = module.old_policy_pass(rollout, teacher_side)
        mark(marks)
        module.update(rollout, teacher_side, old, first_diagnostics=diagnostics if reused else None)
        mark(marks)
        module.engine.sync_weights(student)  # vLLM: push the updated weights; HF: nothing
        mark(marks)
        for name, (t0, m0), (t1, m1) in zip(
            ("rollout", "teacher", "old_logprobs", "update", "sync"), marks, marks[1:], strict=False
        ):
            phases[name] += t1 - t0
            overhead[name] += 0.0 if name in ("rollout", "sync") else (t1 - t0) - (m1 - m0)
        tokens += rollout.num_valid_tokens

    n = args.steps
    total = sum(phases.values())
    rest = sum(overhead.values())
    print(f"device: {device_name(device)}, weights {dtype_name}, rollout engine {args.engine}")
    print(
        f"pair: {pair_name}, objective {args.objective}, "
        f"{args.batch_size} prompts x <= {args.max_new_tokens} tokens, {n} measured steps"
    )
    print(f"{'phase':<16}{'s/step':>10}{'share':>9}{'overhead s':>12}")
    for name, seconds in phases.items():
        print(f"{name:<16}{seconds / n:>10.3f}{seconds / total:>9.1%}{overhead[name] / n:>12.3f}")
    print(
        f"{'total':<16}{total / n:>10.3f}{1:>9.0%}{rest / n:>12.3f}   ({tokens / total:.0f} response tokens/s)"
    )
    print(f"rollout (sampling) alone: {tokens / phases['rollout']:.0f} response tokens/s")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    verdict = "meets" if rest / total < 0.10 else "misses"
    print(
        f"outside forward/backward/sampling: {rest / n:.3f} s/step = {rest / total:.1%} of the step "
        f"({verdict} the 10% target)"
    )


if __name__ == "__main__":
    main()
