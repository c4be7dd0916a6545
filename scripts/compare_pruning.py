"""Which layers to drop: depth-pruned students of the real pair's teacher, measured side by side.

    .venv/bin/python scripts/compare_pruning.py                       # the choices below, 32 prompts x 4
    .venv/bin/python scripts/compare_pruning.py --problems 64 --samples 8 --choices mid2 mid4
    .venv/bin/python scripts/compare_pruning.py --single --problems 16   # each layer dropped alone

For each choice of dropped layers it prints: parameters; forward and reverse KL to the teacher per token
on the teacher's own samples of held-out prompts (how far the copy is from the teacher where the teacher
writes); and, on the student's own samples of the same prompts, its Avg@n, its entropy and high-entropy
fraction (>= tau) against the teacher's on those samples, the KLs there, and its sampling time. The
teacher is converted from its GGUF file first if it is not yet (conf/pair/smollm2_pruned.yaml).
"""

from __future__ import annotations

import argparse
import time

import torch

# Layers of the 30-layer teacher to drop, by name.
CHOICES = {
    "none": (),
    "mid2": (14, 15),
    "late2": (26, 27),
    "deep2": (22, 23),
    "mid4": (13, 14, 15, 16),
    "late4": (24, 25, 26, 27),
    "deep4": (20, 22, 24, 26),
    "mid8": tuple(range(11, 19)),
    "every6th": (5, 11, 17, 23),
    # The layers whose removal alone costs least (forward KL on the teacher's samples, docs/real.md).
    "least2": (4, 25),
    "least4": (3, 4, 25, 26),
    "least6": (3, 4, 5, 25, 26, 27),
}


def load_pair_config(overrides: list[str]):
    """The training config for experiment=real, composed as `python -m eopd.train` would."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    import eopd.train  # noqa: F401 - registers the config's resolvers

    conf = str(Path(__file__).resolve().parent.parent / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        return compose("train", overrides=["experiment=real", *overrides])


def load_teacher(overrides: list[str]):
    """(config, tokenizer, teacher) of experiment=real with `overrides`; the teacher converted if need be."""
    from eopd.conversion import ensure_converted
    from eopd.models import ModelSource, load_model, load_tokenizer
    from eopd.plan import plain

    cfg = load_pair_config(overrides)
    source = ModelSource(**plain(cfg.pair.teacher))
    ensure_converted(source.gguf, source.path)
    tokenizer = load_tokenizer(source)
    return cfg, tokenizer, load_model(source, vocab_size=len(tokenizer)).eval()


def teacher_samples(
    teacher, tokenizer, records, prompt_format, *, samples: int, temperature: float, max_new_tokens: int
):
    from eopd.rollout import sample

    prompts = [prompt_format.encode(tokenizer, r["prompt"]) for r in records for _ in range(samples)]
    eos = tokenizer.eos_token_id
    return sample(
        teacher,
        prompts,
        max_new_tokens=max_new_tokens,
        eos_token_ids=[eos],
        pad_token_id=eos,
        temperature=temperature,
        generator=torch.Generator().manual_seed(1234),
        vocab_size=len(tokenizer),
    )


@torch.no_grad()
def kls_on(batch, student, teacher, vocab_size: int, temperature: float) -> tuple[float, float]:
    """Mean forward and reverse KL per response token of `batch`, full vocabulary."""
    from eopd.objectives import LinearLogits, forward_kl, per_token_fused, reverse_kl
    from eopd.scoring import output_weight, response_hidden_states

    mask = batch.response_mask
    sources = [
        LinearLogits(response_hidden_states(m, batch, pack=True)[mask], output_weight(m), vocab_size)
        for m in (student, teacher)
    ]
    fkl = per_token_fused(forward_kl, *sources, temperature=temperature)
    rkl = per_token_fused(reverse_kl, *sources, temperature=temperature)
    return float(fkl.mean()), float(rkl.mean())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--choices", nargs="+", default=list(CHOICES), choices=list(CHOICES))
    parser.add_argument("--problems", type=int, default=32, help="validation prompts")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kl-only", action="store_true", help="only the KLs on the teacher's samples (fast)")
    parser.add_argument("--single", action="store_true", help="each layer dropped alone (implies --kl-only)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. rollout.temperature=1.0")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from eopd.data import PromptFormat, load_records
    from eopd.evaluation import GRADERS, EvalSpec, ModelSide, evaluate
    from eopd.plan import plain
    from eopd.pruning import prune_layers

    cfg, tokenizer, teacher = load_teacher(args.overrides)
    vocab = len(tokenizer)
    prompt_format = PromptFormat(**plain(cfg.pair.teacher_format))
    records = load_records(plain(cfg.data))["val"][: args.problems]
    temperature, max_new = cfg.rollout.temperature, cfg.rollout.max_new_tokens
    spec = EvalSpec(
        n_samples=args.samples,
        temperature=temperature,
        max_new_tokens=max_new,
        batch_size=16,
        tau=cfg.eval.tau,
    )
    grader = GRADERS[cfg.eval.grader]()
    eos = (tokenizer.eos_token_id,)
    reference = teacher_samples(
        teacher,
        tokenizer,
        records,
        prompt_format,
        samples=args.samples,
        temperature=temperature,
        max_new_tokens=max_new,
    )
    print(
        f"{len(records)} validation prompts x {args.samples} samples, temperature {temperature}, "
        f"up to {max_new} new tokens; KLs in nats per token"
    )
    header = (
        f"{'choice':<9} {'dropped':<24} {'params':>7} {'fkl@T':>6} {'rkl@T':>6} | {'avg':>5} {'H':>5} "
        f"{'high':>5} {'t.high':>6} {'fkl':>6} {'rkl':>6} {'ms/tok':>6}"
    )
    print(
        "@T: on the teacher's samples; the rest on the model's own samples (t.high: the teacher's "
        "high-entropy fraction on them)"
    )
    print(header)
    choices = {name: CHOICES[name] for name in args.choices}
    if args.single:
        args.kl_only = True
        choices = {f"drop{i}": (i,) for i in range(teacher.config.num_hidden_layers)}
    for name, dropped in choices.items():
        keep = [i for i in range(teacher.config.num_hidden_layers) if i not in dropped]
        student = prune_layers(teacher, keep).eval()
        fkl_t, rkl_t = kls_on(reference, student, teacher, vocab, temperature)
        params = sum(p.numel() for p in student.parameters()) / 1e6
        if args.kl_only:
            print(
                f"{name:<9} {str(list(dropped)):<24} {params:>6.1f}M {fkl_t:>6.3f} {rkl_t:>6.3f}", flush=True
            )
            continue
        start = time.perf_counter()
        result = evaluate(
            ModelSide(student, tokenizer, prompt_format, eos),
            records,
            grader,
            spec,
            vocab_size=vocab,
            teacher=ModelSide(teacher, tokenizer, prompt_format, eos),
        )
        seconds = time.perf_counter() - start
        m = result.metrics
        tokens = m["len_mean"] * len(records) * args.samples
        print(
            f"{name:<9} {str(list(dropped)):<24} {sum(p.numel() for p in student.parameters()) / 1e6:>6.1f}M "
            f"{fkl_t:>6.3f} {rkl_t:>6.3f} | {m[f'avg@{args.samples}']:>5.3f} {m['entropy/student']:>5.3f} "
            f"{m['entropy/student_high_frac']:>5.3f} {m['entropy/teacher_high_frac']:>6.3f} "
            f"{m['div/fkl']:>6.3f} {m['div/rkl']:>6.3f} {1000 * seconds / tokens:>6.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
