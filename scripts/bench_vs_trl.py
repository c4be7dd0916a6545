"""eopd's whole training step against TRL's `DistillationTrainer`, same pair, same prompts, side by side.

    make bench-trl                                            # creates .bench-venv (eopd + TRL), tiny and large
    .bench-venv/bin/python scripts/bench_vs_trl.py --sizes tiny --repeats 5
    .bench-venv/bin/python scripts/bench_vs_trl.py --sizes large --repeats 3 --steps 2
    .bench-venv/bin/python scripts/bench_vs_trl.py --sizes real --repeats 3 --steps 3   # the real pair
    .venv/bin/python scripts/bench_vs_trl.py --sizes tiny --profile-ops 12   # eopd's side alone: its operators
    git archive main eopd | tar -x -C /tmp/base && .bench-venv/bin/python scripts/bench_vs_trl.py \
        --baseline /tmp/base                     # also times another eopd source tree: before and after

TRL is not a dependency of eopd: it lives in its own environment (`make bench-venv`: the CPU torch and the
transformers of `.venv`, plus trl==1.16.0), which also holds eopd, so both trainers run on the same kernels.

At sizes tiny and large both sides train a randomly initialised Qwen3 student from a Qwen3 teacher on the
character vocabulary of the embedded task (`eopd.tasks.tokenizer`), fp32 on the CPU, on the same prompts
(the embedded task's, plain text, tokenised the same way; the teacher reads the student's prompt),
sampling at temperature 1. Size `real` measures the training step of `python -m eopd.train
experiment=real` (docs/real.md) on its own pair: SmolLM2-135M-Instruct, converted from its GGUF file,
teaching a copy of itself with decoder layers 3, 4, 25 and 26 removed (120.4M of 134.5M parameters,
49,152-id BPE vocabulary, end token `<|im_end|>`), on word-arithmetic prompts
(`data=word_arithmetic`) rendered through the model's chat template on both sides (eopd: the pair's
`PromptFormat`; TRL: conversational prompts, which TRL renders with the same template; the worker checks
that both give the same token ids), sampling and scoring at temperature 0.5, 16 prompts x <= 40 new
tokens. The teacher must have been converted first (`make real`, or `.venv/bin/python -m eopd.pretrain
pair=smollm2_pruned`). On every size: on-policy sampling at top-p 1, the full-vocabulary forward KL at the
sampling temperature (TRL: `beta=0`; eopd: `objective=fkl`), one optimizer step per rollout batch (TRL:
one batch, no gradient accumulation; eopd: one mini-batch of the whole batch), AdamW, gradient clipping
at 1, no gradient checkpointing on either side (TRL turns it on by default; off it is faster here),
dropout off, the same prompts in the same batches (TRL: `shuffle_dataset=False`). eopd runs under a
Lightning `Trainer` as `eopd.train` does.

A step is timed from the start of a training step to its end on each side (TRL: `on_step_begin` to
`on_step_end`, sampling included; eopd: `on_train_batch_start` to `on_train_batch_end`), after warm-up
steps. `--keep-freed-memory` sets both sides' C allocator as `eopd.train keep_freed_memory=true` does
(`eopd/allocator.py`: freed memory is kept for reuse). Each repeat runs one side in a fresh process; the
sides alternate (TRL, eopd, TRL, eopd, ...) so drifting machine load hits both alike. Printed: per side
the median over repeats of each repeat's median step time (and the range), response tokens per second,
the peak resident set size of the worker process (`ru_maxrss`: the whole process, loading included), and
the ratio of the two step times.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Size:
    student_layers: int
    student_hidden: int
    teacher_layers: int
    teacher_hidden: int
    batch_size: int
    max_new_tokens: int
    temperature: float = 1.0  # sampling and scoring, on both sides
    real: bool = False  # the real pair of experiment=real instead of random Qwen3 models


SIZES = {
    "tiny": Size(2, 128, 4, 256, batch_size=8, max_new_tokens=32),
    "large": Size(6, 384, 6, 512, batch_size=64, max_new_tokens=128),
    # experiment=real: SmolLM2-135M-Instruct (30 x 576) and the student pruned from it (26 x 576)
    "real": Size(26, 576, 30, 576, batch_size=16, max_new_tokens=40, temperature=0.5, real=True),
}
LR = 1e-4
RANDOM_SIZES = [name for name, size in SIZES.items() if not size.real]


@functools.cache
def real_config():
    """The composed config of `python -m eopd.train experiment=real`: the pair, the task, the sampling."""
    from hydra import compose, initialize_config_dir

    import eopd.train  # noqa: F401 - registers the config's resolvers

    conf = str(Path(__file__).resolve().parent.parent / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=real"])
    spec = SIZES["real"]
    found = (cfg.data.batch_size, cfg.rollout.max_new_tokens, cfg.rollout.temperature)
    if found != (spec.batch_size, spec.max_new_tokens, spec.temperature):
        raise SystemExit(
            f"experiment=real now has batch size, max_new_tokens, temperature {found}; size real says "
            f"{(spec.batch_size, spec.max_new_tokens, spec.temperature)}: update SIZES"
        )
    return cfg


def real_teacher_dir(cfg) -> Path:
    """The converted teacher's directory; converts it first when it is absent (which needs the GGUF wheel,
    installed in .venv by `make real` but not in .bench-venv)."""
    directory = Path(cfg.pair.teacher.path)
    if not (directory / "convert.json").is_file():
        from eopd.conversion import GgufSource, ensure_converted
        from eopd.plan import plain

        try:
            ensure_converted(GgufSource(**plain(cfg.pair.teacher.gguf)), directory)
        except FileNotFoundError as error:
            raise SystemExit(
                f"size real: the teacher is not converted in {directory} and cannot be converted here ({error}); "
                "convert it with `.venv/bin/python -m eopd.pretrain pair=smollm2_pruned` (or `make real`)"
            ) from None
    return directory


def build_pair(size: Size):
    """The tokenizer, the student and the teacher (the same on both sides): the real pair for size real,
    else the character tokenizer and a seeded random Qwen3 student and teacher."""
    if size.real:
        return build_real_pair()
    from eopd.models import build_causal_lm
    from eopd.tasks.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.padding_side = "left"
    ids = dict(
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    student = build_causal_lm(
        hidden_size=size.student_hidden,
        num_layers=size.student_layers,
        num_heads=size.student_hidden // 64,
        seed=0,
        **ids,
    )
    teacher = build_causal_lm(
        hidden_size=size.teacher_hidden,
        num_layers=size.teacher_layers,
        num_heads=size.teacher_hidden // 64,
        seed=1,
        **ids,
    )
    return tokenizer, student, teacher


def build_real_pair():
    """The converted SmolLM2-135M-Instruct and a student pruned from it as `eopd.train` makes it: the
    layers the pair drops removed, every kept weight copied (nothing tied to the teacher), fp32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from eopd.pruning import StudentInit, prune_layers

    cfg = real_config()
    directory = real_teacher_dir(cfg)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.padding_side = "left"
    teacher = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    init = StudentInit(**{k: tuple(v) if v is not None else None for k, v in cfg.pair.student.init.items()})
    student = prune_layers(teacher, init.kept(teacher.config.num_hidden_layers))
    return tokenizer, student, teacher


def prompt_texts(n: int) -> list[str]:
    from eopd.tasks.multipath import make_splits

    return [f"Q: {p.prompt}\nA: " for p in make_splits(0, n, 0, 0)["train"]]


def real_records(n: int) -> list[dict]:
    """The first `n` training problems of experiment=real (`data=word_arithmetic`), the suffix included."""
    from eopd.data import load_records
    from eopd.plan import plain

    records = load_records(plain(real_config().data))["train"]
    if n > len(records):
        raise SystemExit(f"size real: {n} prompts asked for, the task has {len(records)} training problems")
    return records[:n]


def trl_prompts(size: Size, n: int) -> list:
    """TRL's `prompt` column: plain text for the random pairs; for the real pair one user turn per problem,
    which TRL renders through the tokenizer's chat template with the generation prompt."""
    if size.real:
        return [[{"role": "user", "content": r["prompt"]}] for r in real_records(n)]
    return prompt_texts(n)


def eopd_records(size: Size, tokenizer, n: int) -> list[dict]:
    """eopd's rollout records for the same prompts: for the real pair as `eopd.train` builds them (the
    pair's prompt formats, `eopd.data.PromptDataset`); else the plain text tokenised as TRL does."""
    if not size.real:
        return [{"prompt": text, "prompt_ids": tokenizer(text)["input_ids"]} for text in prompt_texts(n)]
    from eopd.data import PromptDataset, PromptFormat
    from eopd.plan import plain

    cfg = real_config()
    dataset = PromptDataset(
        real_records(n),
        student_tokenizer=tokenizer,
        student_format=PromptFormat(**plain(cfg.pair.student_format)),
        teacher_format=PromptFormat(**plain(cfg.pair.teacher_format)),
        max_prompt_tokens=cfg.data.max_prompt_tokens,
    )
    if len(dataset) != n:
        raise SystemExit(f"size real: {n - len(dataset)} prompts exceed data.max_prompt_tokens")
    return [dataset[i] for i in range(n)]


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- one side, in its own process -------------------------------------------------------------------


def run_trl(size: Size, steps: int, warmup: int, seed: int) -> dict:
    import transformers
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    tokenizer, student, teacher = build_pair(size)
    total = warmup + steps
    dataset = Dataset.from_dict({"prompt": trl_prompts(size, size.batch_size * total)})
    times: list[float] = []
    tokens: list[int] = []
    prompts_seen: list[tuple[int, ...]] = []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

    class CountingTrainer(DistillationTrainer):
        def _generate(self, prompts):  # TRL's own sampling, counting the tokens it returns
            out = super()._generate(prompts)
            tokens.append(sum(len(ids) for ids in out[1]))
            prompts_seen.extend(tuple(ids) for ids in out[0])
            return out

    with tempfile.TemporaryDirectory() as out_dir:
        args = DistillationConfig(
            output_dir=out_dir,
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=False,
            per_device_train_batch_size=size.batch_size,
            gradient_accumulation_steps=1,
            max_steps=total,
            max_completion_length=size.max_new_tokens,
            temperature=size.temperature,  # sampling and the loss
            top_p=1.0,
            top_k=0,
            beta=0.0,  # forward KL
            learning_rate=LR,
            lr_scheduler_type="constant",
            max_grad_norm=1.0,
            disable_dropout=True,
            logging_steps=10**6,
            save_strategy="no",
            report_to="none",
            seed=seed,
            dataloader_num_workers=0,
            shuffle_dataset=False,  # the prompts in eopd's order: the same batches on both sides
        )
        trainer = CountingTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[Timer()],
        )
        trainer.train()
    # TRL tokenised the prompts itself (for the real pair through the chat template): the same ids as eopd's?
    expected = [tuple(r["prompt_ids"]) for r in eopd_records(size, tokenizer, size.batch_size * total)]
    if prompts_seen != expected:
        raise SystemExit("TRL tokenised the prompts otherwise than eopd: not the same prompts on both sides")
    return _summary("trl", times, tokens, warmup, student, teacher)


def eopd_module(size: Size, tokenizer, student, teacher, seed: int):
    """eopd's side: the `DistillModule` both benchmarks train (fkl, one mini-batch of the whole batch)."""
    from eopd.module import DistillModule
    from eopd.objectives import preset
    from eopd.specs import LogSpec, OptimSpec, PairSpec, RolloutSpec, UpdateSpec

    if size.real:  # as eopd.train assembles it: the pair's end tokens, both <|im_end|>
        from eopd.pairs import assemble_pair

        cfg = real_config()
        pair = assemble_pair(
            tokenizer,
            tokenizer,
            student_eos=cfg.pair.student_eos,
            teacher_eos=cfg.pair.teacher_eos,
            remap_end_token=cfg.pair.remap_end_token,
            name=cfg.pair.name,
        )
    else:
        pair = PairSpec(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            student_eos_ids=(tokenizer.eos_token_id,),
        )
    return DistillModule(
        student,
        teacher,
        preset("fkl", temperature=size.temperature),
        pair=pair,
        tokenizer=tokenizer,
        rollout=RolloutSpec(temperature=size.temperature, max_new_tokens=size.max_new_tokens),
        update=UpdateSpec(mini_batch_size=size.batch_size),
        optim=OptimSpec(lr=LR, schedule="constant"),
        logging=LogSpec(samples_every=0, histograms_every=0),
        seed=seed,
    )


def fit_eopd(module, tokenizer, size: Size, steps: int, callbacks: list) -> None:
    """Train `module` for `steps` rollout batches of the benchmark's prompts under a bare Lightning Trainer."""
    import lightning as L
    from torch.utils.data import DataLoader

    records = eopd_records(size, tokenizer, size.batch_size * steps)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    loader = DataLoader(records, batch_size=size.batch_size, shuffle=False, collate_fn=list)
    trainer.fit(module, train_dataloaders=loader)


def run_eopd(size: Size, steps: int, warmup: int, seed: int) -> dict:
    import lightning as L

    tokenizer, student, teacher = build_pair(size)
    module = eopd_module(size, tokenizer, student, teacher, seed)
    times: list[float] = []
    tokens: list[int] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            times.append(time.perf_counter() - self.start)
            logs = pl_module.last_logs
            tokens.append(round(logs["perf/tokens_per_s"] * logs["time/step"]))

    fit_eopd(module, tokenizer, size, warmup + steps, [Timer()])
    return _summary("eopd", times, tokens, warmup, student, teacher)


def _summary(side: str, times, tokens, warmup: int, student, teacher) -> dict:
    times, tokens = times[warmup:], tokens[warmup:]
    return {
        "side": side,
        "step_s": statistics.median(times),
        "tokens_per_step": statistics.mean(tokens),
        "tokens_per_s": sum(tokens) / sum(times),
        "student_params": parameters(student),
        "teacher_params": parameters(teacher),
    }


# ---- the driver ----------------------------------------------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    size = SIZES[args.worker_size]
    run = run_trl if args.worker == "trl" else run_eopd
    result = run(size, args.steps, args.warmup, args.seed)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print("RESULT " + json.dumps(result), flush=True)


def in_fresh_process(side: str, size: str, args: argparse.Namespace) -> dict:
    """One side in a fresh process; "eopd-base" is eopd imported from the `--baseline` source tree."""
    command = [
        sys.executable,
        __file__,
        "--worker",
        "trl" if side == "trl" else "eopd",
        "--worker-size",
        size,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
        "--seed",
        str(args.seed),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    if args.keep_freed_memory:  # glibc reads these at start-up: what eopd/allocator.py sets in-process,
        # for both sides alike and for a --baseline tree that has no eopd.allocator
        env.update(MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(2**31 - 1))
    if side == "eopd-base":
        env["PYTHONPATH"] = os.path.abspath(args.baseline)
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-5000:])
        raise SystemExit(f"the {side} worker failed at size {size} (exit {done.returncode})")
    return json.loads(lines[-1][len("RESULT ") :])


def step_counts(size: str, args: argparse.Namespace) -> tuple[int, int, int]:
    """Processes per side, measured steps and warm-up steps for `size`: the arguments or the defaults."""
    defaults = (5, 20, 3) if size == "tiny" else (3, 2, 1)
    return (
        args.repeats or defaults[0],
        args.steps or defaults[1],
        args.warmup if args.warmup is not None else defaults[2],
    )


def profile_eopd(size_name: str, args: argparse.Namespace) -> None:
    """Print eopd's most costly operators over the measured steps of one process (torch.profiler): self
    CPU time and calls per step. The profiler's own cost per operator inflates the small ones."""
    import lightning as L
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(args.threads)
    size = SIZES[size_name]
    _, steps, warmup = step_counts(size_name, args)
    tokenizer, student, teacher = build_pair(size)
    module = eopd_module(size, tokenizer, student, teacher, args.seed)
    profiler = profile(activities=[ProfilerActivity.CPU])

    class Window(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == warmup:
                profiler.start()

    fit_eopd(module, tokenizer, size, warmup + steps, [Window()])
    profiler.stop()
    events = sorted(profiler.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events) / 1e3 / steps
    print(
        f"{size_name}: eopd's operators over {steps} steps after {warmup} warm-up, {total:.1f} ms per step in all"
    )
    print(f"{'ms / step':>10}{'calls / step':>14}  operator")
    for event in events[: args.profile_ops]:
        print(f"{event.self_cpu_time_total / 1e3 / steps:>10.2f}{event.count / steps:>14.1f}  {event.key}")


def describe(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes",
        nargs="+",
        choices=list(SIZES),
        default=RANDOM_SIZES,
        help="default: the random pairs (real needs the converted teacher: docs/real.md)",
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="processes per side (default 5 tiny, 3 large and real)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="measured steps per process (default 20 tiny, else 2)"
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="unmeasured first steps (default 3 tiny, else 1)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads on both sides")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--baseline", default=None, help="a directory holding another eopd package, timed as side eopd-base"
    )
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="both sides keep freed memory in the C allocator (eopd.train keep_freed_memory=true)",
    )
    parser.add_argument(
        "--profile-ops",
        type=int,
        default=0,
        metavar="N",
        help="instead: profile eopd's side in this process and print its N most costly operators",
    )
    parser.add_argument("--worker", choices=["trl", "eopd"], help=argparse.SUPPRESS)
    parser.add_argument("--worker-size", choices=list(SIZES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.profile_ops:
        for size in args.sizes:
            profile_eopd(size, args)
        return
    try:
        import trl
    except ImportError:
        raise SystemExit(
            "TRL is not installed here: make bench-venv, then run with .bench-venv/bin/python"
        ) from None
    import torch
    import transformers

    print(
        f"trl {trl.__version__}, transformers {transformers.__version__}, torch {torch.__version__}, "
        f"{args.threads} threads, fp32, cpu; load average at start {os.getloadavg()[0]:.1f}"
    )
    print(
        "allocator: "
        + (
            "both sides keep freed memory (--keep-freed-memory)"
            if args.keep_freed_memory
            else "glibc's default"
        )
    )
    if args.baseline:
        print(f"eopd-base: the eopd package in {os.path.abspath(args.baseline)}")
    if any(SIZES[size].real for size in args.sizes):
        print(f"real: teacher {real_teacher_dir(real_config())}")  # converted once, before any worker
    sides = ("trl", "eopd") + (("eopd-base",) if args.baseline else ())
    table = []
    for size in args.sizes:
        run_args = argparse.Namespace(**vars(args))
        repeats, run_args.steps, run_args.warmup = step_counts(size, args)
        results: dict[str, list[dict]] = {side: [] for side in sides}
        for _ in range(repeats):
            for side in sides:
                results[side].append(in_fresh_process(side, size, run_args))
                print(f"  {size} {side}: {results[side][-1]}", file=sys.stderr, flush=True)
        table.append((size, repeats, run_args, results))
    print(f"load average at end {os.getloadavg()[0]:.1f}\n")
    header = (
        f"{'size':<7}{'side':<10}{'s / step':>24}{'steps / s':>11}{'tokens / step':>15}{'tokens / s':>22}"
        f"{'peak RSS MiB':>24}"
    )
    print(header)
    print("-" * len(header))
    for size, repeats, run_args, results in table:
        spec = SIZES[size]
        for side in sides:
            rows = results[side]
            steps = [r["step_s"] for r in rows]
            print(
                f"{size:<7}{side:<10}{describe(steps, '.3f'):>24}{1 / statistics.median(steps):>11.2f}"
                f"{statistics.mean(r['tokens_per_step'] for r in rows):>15.0f}"
                f"{describe([r['tokens_per_s'] for r in rows], '.0f'):>22}"
                f"{describe([r['peak_rss_mib'] for r in rows], '.0f'):>24}"
            )
        trl_s = statistics.median(r["step_s"] for r in results["trl"])
        for side in sides[1:]:
            side_s = statistics.median(r["step_s"] for r in results[side])
            print(f"{size:<7}{side} is {trl_s / side_s:.2f}x TRL's speed (ratio of median step times)")
        first = results["eopd"][0]
        print(
            f"{size:<7}student "
            f"{first['student_params'] / 1e6:.1f}M params ({spec.student_layers} x {spec.student_hidden}), "
            f"teacher {first['teacher_params'] / 1e6:.1f}M ({spec.teacher_layers} x {spec.teacher_hidden}), "
            f"{spec.batch_size} prompts x <= {spec.max_new_tokens} new tokens at temperature {spec.temperature:g}, "
            f"{repeats} processes per side x {run_args.steps} steps after {run_args.warmup} warm-up"
        )
    print(f"\n{json.dumps({s: asdict(SIZES[s]) for s in args.sizes})}")


if __name__ == "__main__":
    main()
