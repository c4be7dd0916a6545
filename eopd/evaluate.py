"""The evaluation CLI: sample a saved model on a data split or on benchmarks, print and save the metrics.

    python -m eopd.evaluate checkpoint=outputs/runs/eopd-s0/<time>/student         # embedded test split
    python -m eopd.evaluate checkpoint=<dir> teacher=outputs/pairs/embedded/teacher eval.n_samples=8
    python -m eopd.evaluate checkpoint=outputs/pairs/embedded/teacher format.template=chat eos="<|im_end|>"
    python -m eopd.evaluate checkpoint=<dir> format.prefix="" format.suffix="" +benchmarks.math500={}
    python -m eopd.evaluate checkpoint=<run dir>/student pair=qwen3_8b_to_qwen3_1.7b_base

The metrics are those of `eopd.evaluation.evaluate` (see its module docstring).
"""

from __future__ import annotations

from eopd.data import PromptFormat
from eopd.evaluation import GRADERS, EvalSpec, ModelSide, evaluate, format_table


def main() -> None:
    """`python -m eopd.evaluate checkpoint=DIR [teacher=DIR] [eval.*=...]`: print and save the metrics."""
    import json
    from pathlib import Path

    import hydra
    from omegaconf import OmegaConf

    from eopd.data import load_records
    from eopd.models import ModelSource, load_model, load_tokenizer
    from eopd.pairs import PairKeys, assemble_pair

    conf_dir = str(Path(__file__).resolve().parent.parent / "conf")

    @hydra.main(version_base="1.3", config_path=conf_dir, config_name="evaluate")
    def _main(cfg) -> float:
        if OmegaConf.is_missing(cfg, "checkpoint"):
            raise SystemExit(
                "checkpoint is required: python -m eopd.evaluate checkpoint=DIR (a save_pretrained directory)"
            )
        plain = with_pair_formats(OmegaConf.to_container(cfg, resolve=True))
        spec = EvalSpec(**plain["eval"])
        if cfg.grader not in GRADERS:
            raise ValueError(f"grader={cfg.grader!r} is unknown; allowed: {', '.join(GRADERS)}")
        benchmarks = plain.get("benchmarks") or {}
        if benchmarks:  # loaded and checked before any model
            from eopd.benchmarks import BenchmarkProtocol, load_benchmarks

            protocol = BenchmarkProtocol(**plain["benchmark_protocol"])
            records = {"benchmarks": load_benchmarks(benchmarks, suffix=protocol.suffix)}
        else:
            records = load_records(plain["data"])
            if cfg.split not in records:
                raise ValueError(f"split={cfg.split!r} is not a data split; allowed: {', '.join(records)}")
        sources, tokenizers = {}, {}
        for role, key in (("student", "checkpoint"), ("teacher", "teacher")):
            if plain[key] is not None:
                sources[role] = ModelSource(path=plain[key])
                sources[role].check(key)
                tokenizers[role] = load_tokenizer(sources[role])
        pair = assemble_pair(
            tokenizers["student"],
            tokenizers.get("teacher"),
            student_eos=plain["eos"],
            teacher_eos=plain["teacher_eos"],
            remap_end_token=plain.get("remap_end_token", True),
            keys=PairKeys(pair="teacher", student_eos="eos", teacher_eos="teacher_eos"),
        )
        vocab, remap = pair.vocab_size, pair.remap_end_token
        sides = {
            role: ModelSide(
                load_model(sources[role], vocab_size=len(tokenizers[role])),
                tokenizers[role],
                PromptFormat(**plain[fmt]),
                eos_ids,
            )
            for role, fmt, eos_ids in (
                ("student", "format", pair.student_eos_ids),
                ("teacher", "teacher_format", pair.teacher_eos_ids),
            )
            if role in sources
        }
        if benchmarks:
            return _main_benchmarks(cfg, sides["student"], records["benchmarks"], protocol, vocab)
        metrics = evaluate(
            sides["student"],
            records[cfg.split][: cfg.n_problems],
            GRADERS[cfg.grader](),
            spec,
            vocab_size=vocab,
            teacher=sides.get("teacher"),
            remap_end_token_ids=remap,
        ).metrics
        print(format_table({Path(cfg.checkpoint).name: metrics}, list(metrics)))
        out = Path(cfg.output) if cfg.output else Path(cfg.checkpoint) / f"eval_{cfg.split}.json"
        out.write_text(json.dumps(metrics, indent=2))
        print(f"saved to {out}")
        return metrics[f"pass@{spec.n_samples}"]

    _main()


def with_pair_formats(plain: dict) -> dict:
    """The evaluate config with the formats, end tokens and end-token remap taken from its `pair`.

    `python -m eopd.evaluate checkpoint=<run>/student pair=<the run's pair>` then reads each model's prompts
    as training did; without a pair the four keys are used as given.
    """
    pair = plain.get("pair")
    if not pair:
        return plain
    return {
        **plain,
        "format": pair["student_format"],
        "eos": pair["student_eos"],
        "teacher_format": pair["teacher_format"],
        "teacher_eos": pair["teacher_eos"],
        "remap_end_token": pair.get("remap_end_token", True),
    }


def _main_benchmarks(cfg, side: ModelSide, benchmarks, protocol, vocab_size: int) -> float:
    """The CLI with benchmarks: print their table (and the paper's rows), save it as JSON."""
    import json
    from pathlib import Path

    from eopd.benchmarks import benchmark_table, evaluate_benchmarks, format_benchmark_table, paper_comparison

    name = Path(cfg.checkpoint).name
    results = evaluate_benchmarks(side, benchmarks, protocol, vocab_size=vocab_size)
    n = protocol.n_samples
    print(format_benchmark_table({name: results}, n))
    if cfg.paper_student:
        print("\n" + paper_comparison(cfg.paper_student, name, results, n))
    mean = {
        k.split("/", 1)[1]: v
        for k, v in benchmark_table({name: results}, n)[name].items()
        if k.startswith("mean/")
    }
    out = Path(cfg.output) if cfg.output else Path(cfg.checkpoint) / "eval_benchmarks.json"
    out.write_text(json.dumps({**results, "mean": mean}, indent=2))
    print(f"saved to {out}")
    return mean[f"pass@{n}"]


if __name__ == "__main__":
    main()
