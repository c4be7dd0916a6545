"""What a run reports besides checkpoints: the final table (printed, eval.json, wandb), loggers, progress."""

import json
from types import SimpleNamespace

from conftest import compose_train

from eopd import reports
from eopd.evaluation import EvalResult, EvalSpec
from eopd.metrics import ProblemResults


class WandbLogger:
    """Stands in for Lightning's WandbLogger (reports look for the class name): a summary and tables."""

    def __init__(self) -> None:
        self.experiment = SimpleNamespace(summary={})
        self.tables: dict = {}

    def log_table(self, key, columns, data) -> None:
        self.tables[key] = (columns, data)


def test_the_final_table_reaches_eval_json_and_the_wandb_summary(tmp_path, capsys):
    table = {
        "student before": {"avg@8": 0.4, "pass@8": 0.9},
        "student after": {"avg@8": 0.5, "pass@8": 1.0},
        "teacher": {"avg@8": 0.9, "pass@8": 1.0},
    }
    problems = {
        model: ProblemResults(ids=("test-00000", "test-00001"), n=8, correct=(c, 8), paths=(min(c, 1), 2))
        for model, c in (("student before", 0), ("student after", 3), ("teacher", 8))
    }
    results = {model: EvalResult(table[model], problems[model]) for model in table}
    logger = WandbLogger()
    final = SimpleNamespace(n_problems=4, split="test")

    reports.report_table(results, EvalSpec(n_samples=8), final, tmp_path, [logger])

    text = (tmp_path / "eval.json").read_text()
    saved = json.loads(text)
    assert {model: saved[model] for model in table} == table  # the rows old readers know, unchanged
    assert saved["problems"]["student after"] == {
        "n": 8,
        "ids": ["test-00000", "test-00001"],
        "correct": [3, 8],
        "paths": [1, 2],
    }
    assert {ProblemResults.from_json(p) for p in saved["problems"].values()} == set(problems.values())
    assert '"correct": [3, 8],' in text  # one line per list, not one per problem
    summary = logger.experiment.summary
    assert (summary["test/avg@8"], summary["test/pass@8"]) == (0.5, 1.0)  # as in finished.json
    assert summary["test/before/avg@8"] == 0.4 and summary["test/teacher/avg@8"] == 0.9
    columns, rows = logger.tables["test/final"]
    assert columns[:2] == ["model", "avg@8"]
    assert [row[:2] for row in rows] == [["student before", 0.4], ["student after", 0.5], ["teacher", 0.9]]
    assert "student after" in capsys.readouterr().out


def test_the_table_says_what_training_changed_paired_by_problem():
    ids = tuple(f"test-{i}" for i in range(4))
    before = EvalResult({"div/fkl": 1.0, "div/rkl": 2.0}, ProblemResults(ids, 8, (0, 2, 4, 8), (0,) * 4))
    after = EvalResult({"div/fkl": 0.5, "div/rkl": 1.5}, ProblemResults(ids, 8, (2, 4, 4, 8), (0,) * 4))

    line = reports.training_change({"student before": before, "student after": after})

    # differences 2/8, 2/8, 0, 0: mean 0.125, standard deviation 0.1443, standard error 0.0722
    assert line.startswith(
        "student after - before: avg@8 +0.125 (standard error 0.072, paired over 4 problems)"
    )
    assert line.endswith("div/fkl x0.50; div/rkl x0.75")
    assert reports.training_change({"student after": after}) is None


def test_the_wandb_logger_is_made_without_the_anonymous_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: offline
    monkeypatch.delenv("WANDB_API_KEY", raising=False)

    loggers = reports.loggers(compose_train(["logger=wandb"]), tmp_path)

    assert [type(logger).__name__ for logger in loggers] == ["CSVLogger", "WandbLogger"]
    # wandb warns "The anonymous setting has no effect" whenever the key is passed, even as None.
    assert "anonymous" not in loggers[1]._wandb_init


def test_the_progress_bar_counts_rollout_steps_not_epochs():
    bar = reports.progress_bar(600)
    assert bar.total_train_batches == 600
    if hasattr(bar, "_get_train_description"):  # the Rich bar (tqdm's is set when an epoch starts)
        assert bar._get_train_description(4) == "rollout step"  # Lightning's own: "Epoch 4/-2"
