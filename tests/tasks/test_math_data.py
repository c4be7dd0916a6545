"""Math prompt data: JSONL and Parquet rows become prompts with the paper's suffix; bad rows say where they are."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from eopd.data import load_records
from eopd.tasks.math_data import PAPER_SUFFIX, DataError, MathSource, load_math_records, normalize_answer
from tests.conftest import write_jsonl

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
ROWS = [
    {"problem": "What is 1 + 1?", "answer": "2", "level": "Level 1"},
    {"problem": "Simplify 2/4.", "answer": "\\frac{1}{2}", "level": "Level 2"},
]


def test_jsonl_rows_become_prompts_with_the_paper_suffix(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)

    records = load_math_records(MathSource(path=str(path)))

    assert PAPER_SUFFIX == " Let's think step by step and output the final answer within \\boxed{}."
    assert [r["prompt"] for r in records] == [row["problem"] + PAPER_SUFFIX for row in ROWS]
    assert [r["question"] for r in records] == [row["problem"] for row in ROWS]
    assert [r["answer"] for r in records] == ["2", "\\frac{1}{2}"]
    assert [r["id"] for r in records] == ["0", "1"]


def test_parquet_gives_the_same_records_as_jsonl(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "p.parquet")
    write_jsonl(tmp_path / "p.jsonl", ROWS)

    from_parquet = load_math_records(MathSource(path=str(tmp_path / "p.parquet"), suffix=" Go."))
    from_jsonl = load_math_records(MathSource(path=str(tmp_path / "p.jsonl"), suffix=" Go."))

    assert from_parquet == from_jsonl
    assert from_parquet[0]["prompt"] == "What is 1 + 1? Go."


def test_field_mapping_ids_limit_and_boxed_answers(tmp_path):
    rows = [
        {"q": "Find x.", "solution": "So $x = \\boxed{\\frac{3}{4}}$.", "uid": "a"},
        {"q": "Find y.", "solution": "First \\boxed{1}, then \\boxed{2}.", "uid": "b"},
        {"q": "Find z.", "solution": "\\boxed{9}", "uid": "c"},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    source = MathSource(
        path=str(path),
        prompt_field="q",
        answer_field="solution",
        answer_from_boxed=True,
        id_field="uid",
        limit=2,
    )

    records = load_math_records(source)

    assert [(r["id"], r["question"], r["answer"]) for r in records] == [
        ("a", "Find x.", "\\frac{3}{4}"),
        ("b", "Find y.", "2"),  # the last box of the solution
    ]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("17", "17"),
        (27.0, "27"),
        (2.5, "2.5"),
        (3, "3"),
        (["$3$", "$5$"], "$3$, $5$"),
        ("  ", None),
        ([], None),
    ],
)
def test_answers_are_normalised_to_text(value, text):
    assert normalize_answer(value) == text


def test_a_row_without_a_field_names_the_file_the_line_and_the_field(tmp_path):
    path = tmp_path / "p.jsonl"
    # Line 3 is blank and still counted: the error points at the line an editor shows.
    path.write_text('{"problem": "a", "answer": "1"}\n{"problem": "b", "answer": "2"}\n\n{"problem": "c"}\n')

    with pytest.raises(DataError) as info:
        load_math_records(MathSource(path=str(path)))

    message = str(info.value)
    assert f"{path}:4" in message
    assert "missing field 'answer'" in message
    assert "problem" in message  # the fields the row does have


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"problem": "a", "answer": "1"}\n{"problem": "b", "answer": \n', r":2: not valid JSON"),
        ('["What is 1+1?", "2"]\n', r":1: expected a JSON object"),
        ('{"problem": "", "answer": "1"}\n', r":1: field 'problem' must be non-empty text"),
        ('{"problem": "a", "answer": null}\n', r":1: field 'answer' is empty"),
    ],
)
def test_malformed_rows_are_reported_with_their_line(tmp_path, content, expected):
    path = tmp_path / "p.jsonl"
    path.write_text(content)

    with pytest.raises(DataError, match=re.escape(str(path)) + re.escape(expected)):
        load_math_records(MathSource(path=str(path)))


def test_a_solution_without_a_box_is_a_bad_row(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"problem": "a", "solution": "the answer is 4"}])

    with pytest.raises(DataError, match=r"p.jsonl:1: field 'solution' has no \\boxed"):
        load_math_records(MathSource(path=str(path), answer_field="solution", answer_from_boxed=True))


def test_bad_parquet_row_names_the_row(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(
        pa.Table.from_pylist([{"problem": "a", "answer": "1"}, {"problem": "b", "answer": None}]),
        tmp_path / "p.parquet",
    )

    with pytest.raises(DataError, match=r"p.parquet row 2: field 'answer' is empty"):
        load_math_records(MathSource(path=str(tmp_path / "p.parquet")))


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_an_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)

    with pytest.raises(DataError, match=r"empty.jsonl: no rows"):
        load_math_records(MathSource(path=str(path)))


def test_a_missing_or_unknown_file_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"config 'data.path'=.*nope.jsonl: no such file"):
        load_math_records(MathSource(path=str(tmp_path / "nope.jsonl")))
    (tmp_path / "p.csv").write_text("problem,answer\n")
    with pytest.raises(DataError, match=r"unknown file type '.csv'"):
        load_math_records(MathSource(path=str(tmp_path / "p.csv")))
    with pytest.raises(DataError, match="set data.path"):
        MathSource()


def test_an_unreachable_hub_dataset_says_how_to_use_a_local_file(monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)

    with pytest.raises(DataError) as info:
        load_math_records(
            MathSource(hub_id="eopd-tests/not-a-dataset", split="test", key="eval.benchmarks.x")
        )

    message = str(info.value)
    assert "eopd-tests/not-a-dataset" in message
    assert "eval.benchmarks.x.path" in message


def test_the_dapo_config_strips_dapo_s_own_instructions(tmp_path):
    pattern = OmegaConf.load(CONF_DIR / "data" / "dapo_math_14k.yaml").prompt_pattern
    wrapped = (
        "Solve the following math problem step by step. The last line of your response should be of the form "
        "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
        "Let $x$ satisfy $2x = 6$.\nFind $x$.\n\n"
        'Remember to put your answer on its own line after "Answer:".'
    )
    path = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": wrapped, "solution": "3"}, {"prompt": "Plain.", "solution": "1"}]
    )

    records = load_math_records(
        MathSource(path=str(path), prompt_field="prompt", answer_field="solution", prompt_pattern=pattern)
    )

    assert records[0]["prompt"] == "Let $x$ satisfy $2x = 6$.\nFind $x$." + PAPER_SUFFIX
    assert records[1]["question"] == "Plain."  # no wrapper: kept as is


def test_math_data_config_holds_out_fixed_validation_and_test_splits(math_files):
    data = {
        **OmegaConf.to_container(OmegaConf.load(CONF_DIR / "data" / "jsonl.yaml")),
        "path": str(math_files["train"]),
    }
    data.update(n_val=6, n_test=10)

    splits = load_records(data)
    again = load_records(data)

    assert {name: len(rows) for name, rows in splits.items()} == {"train": 384, "val": 6, "test": 10}
    assert splits == again  # seeded
    ids = [{r["id"] for r in rows} for rows in splits.values()]
    assert sum(map(len, ids)) == len(set().union(*ids)) == 400  # disjoint, nothing lost
    assert set(load_records({**data, "n_val": 0, "n_test": 0})) == {"train"}
    with pytest.raises(ValueError, match="data.n_val=200 and data.n_test=200"):
        load_records({**data, "n_val": 200, "n_test": 200})
