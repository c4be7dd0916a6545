"""What a run shows and writes besides checkpoints: loggers, progress bar, final test and benchmark tables."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("eopd.train")


def loggers(cfg: DictConfig, run_dir: Path) -> list:
    import warnings

    from lightning.pytorch.loggers import CSVLogger

    # The run directory already holds config.yaml, so Lightning warns that it is not empty and would
    # delete an old metrics.csv; a fresh run has none, and a resumed one gets its rows back
    # (checkpointing.keep_logs_until).
    warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
    loggers: list = [CSVLogger(save_dir=str(run_dir), name="", version="")]
    wandb_cfg = cfg.logger.get("wandb")
    if wandb_cfg is not None and wandb_cfg.get("mode", "auto") != "disabled":
        from lightning.pytorch.loggers import WandbLogger

        mode = wandb_cfg.get("mode", "auto")
        if mode == "auto":
            mode = "online" if _wandb_api_key_present() else "offline"
        if mode == "offline":
            log.info(
                "wandb: offline (no API key); sync later with `wandb sync %s/wandb/offline-run-*`", run_dir
            )
        loggers.append(
            WandbLogger(
                project=wandb_cfg.project,
                entity=wandb_cfg.get("entity"),
                name=cfg.run_name,
                group=cfg.group,
                tags=list(cfg.tags),
                save_dir=str(run_dir),
                offline=mode == "offline",
                config=OmegaConf.to_container(cfg, resolve=True),
            )
        )
        # Lightning passes anonymous=None to wandb.init, which wandb >= 0.19 warns has no effect.
        loggers[-1]._wandb_init.pop("anonymous", None)
    return loggers


def _wandb_api_key_present() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


# Where each row of the final table goes in a wandb run's summary (the trained student's as in finished.json).
SUMMARY_PREFIXES = {"student after": "test", "student before": "test/before", "teacher": "test/teacher"}


def report_table(results, spec, final, run_dir: Path, loggers: list = ()) -> None:
    """Print the final test table, write it to eval.json and, for wandb, into the run summary and a Table.

    `results` maps each row ("student before", "student after", "teacher") to its
    `eopd.evaluation.EvalResult`. eval.json holds one object of metrics per row and, under "problems", each
    row's per-problem results (`ProblemResults.to_json`: n, ids, correct, paths), from which
    `eopd.compare` resamples problems. In the summary the trained student's metrics are `test/<metric>`
    (as in finished.json), the others `test/before/<metric>` and `test/teacher/<metric>`, so that runs can
    be grouped and compared on them in the wandb UI; the Table `test/final` holds the printed table.
    """
    from eopd.evaluation import format_table
    from eopd.metrics import final_table_keys

    table = {model: result.metrics for model, result in results.items()}
    n = spec.n_samples
    keys = final_table_keys(n, {k for row in table.values() for k in row})
    text = format_table(table, keys)
    header = (
        f"final evaluation on {final.n_problems} {final.split} problems, {n} samples each, "
        f"temperature {spec.temperature}, top-p {spec.top_p}"
    )
    change = training_change(results)
    print(f"\n{header}\n{text}\n" + (f"{change}\n" if change else ""), flush=True)
    problems = {model: result.problems.to_json() for model, result in results.items()}
    (run_dir / "eval.json").write_text(eval_json_text({**table, "problems": problems}))
    for logger in loggers:
        if type(logger).__name__ != "WandbLogger":
            continue
        summary = {
            f"{SUMMARY_PREFIXES.get(model, 'test/' + model)}/{key}": value
            for model, metrics in table.items()
            for key, value in metrics.items()
        }
        logger.experiment.summary.update(summary)
        rows = [[model, *(metrics.get(key) for key in keys)] for model, metrics in table.items()]
        logger.log_table("test/final", columns=["model", *keys], data=rows)


def training_change(results) -> str | None:
    """One line on what training changed, when the table has the student before and after: the Avg@n
    difference with its standard error over problems (paired by problem), and each KL's ratio."""
    before, after = results.get("student before"), results.get("student after")
    if before is None or after is None or before.problems.ids != after.problems.ids:
        return None
    import numpy as np

    n = after.problems.n
    diff = (np.array(after.problems.correct) - np.array(before.problems.correct)) / n
    se = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else float("nan")
    line = f"student after - before: avg@{n} {diff.mean():+.3f} (standard error {se:.3f}, paired over {len(diff)} problems)"
    for key in ("div/fkl", "div/rkl"):
        if before.metrics.get(key) and key in after.metrics:
            line += f"; {key} x{after.metrics[key] / before.metrics[key]:.2f}"
    return line


def eval_json_text(saved: dict) -> str:
    """eval.json's text: indented JSON with each flat list (the per-problem results) on one line."""
    text = json.dumps(saved, indent=2)
    # JSON strings hold no raw newline, so ",\n<indent>" only ever separates the elements of a list.
    return re.sub(
        r"\[\n\s*([^\[\]{}]*?)\n\s*\]", lambda m: "[" + re.sub(r",\n\s*", ", ", m.group(1)) + "]", text
    )


def report_benchmarks(runs, protocol, cfg: DictConfig, run_dir: Path) -> dict[str, float]:
    """Print the benchmark table (and the paper's rows), add it to eval.json; returns the logged metrics."""
    from eopd.benchmarks import benchmark_table, format_benchmark_table, paper_comparison

    n = protocol.n_samples
    table = benchmark_table(runs, n)
    header = (
        f"benchmarks: {n} samples per problem, temperature {protocol.temperature}, top-p {protocol.top_p}, "
        f"up to {protocol.max_new_tokens} new tokens; Avg@{n} and Pass@{n} as fractions"
    )
    print(f"\n{header}\n{format_benchmark_table(runs, n)}\n", flush=True)
    after = runs.get("student after")
    if cfg.eval.get("paper_student") and after is not None:
        print(paper_comparison(cfg.eval.paper_student, cfg.objective.name, after, n) + "\n", flush=True)
    path = run_dir / "eval.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    saved["benchmarks"] = {
        model: {
            **results,
            "mean": {k.split("/", 1)[1]: v for k, v in table[model].items() if k.startswith("mean/")},
        }
        for model, results in runs.items()
    }
    path.write_text(eval_json_text(saved))
    row = table.get("student after") or {}
    return {f"bench/{key}": value for key, value in row.items()}


def progress_bar(rollout_steps: int):
    """Lightning's progress bar, counting the run's rollout steps ("rollout step 4/600") instead of epochs.

    One Lightning epoch is one pass over the prompts, and the run is bounded by steps, not epochs, so
    Lightning's own bar would read "Epoch 4/-2". Rich when it is installed (as Lightning chooses), else tqdm.
    """
    import importlib.util

    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    class RichRolloutBar(RichProgressBar):
        @property
        def total_train_batches(self) -> int:
            return rollout_steps

        def _get_train_description(self, current_epoch: int) -> str:
            return "rollout step"

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            self._update(self.train_progress_bar_id, pl_module.rollout_step)

    class TQDMRolloutBar(TQDMProgressBar):
        @property
        def total_train_batches(self) -> int:
            return rollout_steps

        def on_train_epoch_start(self, trainer, *args) -> None:
            super().on_train_epoch_start(trainer, *args)
            self.train_progress_bar.set_description("rollout step")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, pl_module.rollout_step - 1)

    return RichRolloutBar() if importlib.util.find_spec("rich") else TQDMRolloutBar()
