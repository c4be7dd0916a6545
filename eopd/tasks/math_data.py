"""Math prompt data: rows from a local JSONL or Parquet file or a hub dataset, checked and mapped to records.

A record is what `eopd.data.PromptDataset` and the math grader read:

    {"id": str, "prompt": question + suffix, "question": question, "answer": str}

The source's own field names are configurable (`prompt_field`, `answer_field`); the answer can also be the
last `\\boxed{...}` of a worked solution (MATH's `solution` field). Every row is checked when it is read:
a missing or empty field stops the load with the file, the line (JSONL) or row (Parquet, hub) and the
field in the message, so a bad row never surfaces hours into a run.

    records = load_math_records(MathSource(path="prompts.jsonl"))
    records = load_math_records(MathSource(hub_id="HuggingFaceH4/MATH-500", split="test"))
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The paper's instruction after every problem (verl's MATH preprocessing joins it with one space).
PAPER_SUFFIX = " Let's think step by step and output the final answer within \\boxed{}."

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)


class DataError(ValueError):
    """A data file, hub dataset or row that cannot be used; the message says where and how to fix it."""


@dataclass(frozen=True)
class MathSource:
    """Where math problems come from and which of their fields hold the question and the answer.

    Attributes:
        path: a local JSONL (one JSON object per line) or Parquet file; when set, the hub fields are unused.
        hub_id: a `datasets` hub id, read with `datasets.load_dataset(hub_id, hub_config, split=split)`.
        hub_config: the dataset's configuration (subset) name, or None.
        split: the hub split to read.
        prompt_field: the field holding the question text.
        answer_field: the field holding the reference answer (a string, a number, or a list of them,
            joined with ", ").
        answer_from_boxed: the answer field is a worked solution; the answer is its last `\\boxed{...}`.
        prompt_pattern: optional regular expression with one group; where it matches the question text,
            the question is the group (to strip another dataset's own instructions). Rows it does not
            match keep their text.
        id_field: the field holding a problem id; None numbers the rows.
        suffix: appended to every question to form the prompt (the paper's instruction by default).
        limit: keep only the first `limit` rows (quick runs); None keeps all.
        key: the config key these settings came from, quoted in error messages ("data",
            "eval.benchmarks.math500").
    """

    path: str | None = None
    hub_id: str | None = None
    hub_config: str | None = None
    split: str = "train"
    prompt_field: str = "problem"
    answer_field: str = "answer"
    answer_from_boxed: bool = False
    prompt_pattern: str | None = None
    id_field: str | None = None
    suffix: str = PAPER_SUFFIX
    limit: int | None = None
    key: str = "data"

    def __post_init__(self) -> None:
        if not self.path and not self.hub_id:
            raise DataError(f"config '{self.key}': set {self.key}.path (a JSONL or Parquet file) or a hub_id")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise DataError(f"config '{self.key}.limit'={self.limit!r} must be a positive integer or null")
        if self.prompt_pattern is not None:
            try:
                groups = re.compile(self.prompt_pattern).groups
            except re.error as error:
                raise DataError(
                    f"config '{self.key}.prompt_pattern' is not a regular expression: {error}"
                ) from None
            if groups != 1:
                raise DataError(
                    f"config '{self.key}.prompt_pattern' must have exactly one group, has {groups}"
                )

    def describe(self) -> str:
        """The source in a few words: the file, or the hub id with its configuration and split."""
        if self.path:
            return str(self.path)
        config = f" ({self.hub_config})" if self.hub_config else ""
        return f"{self.hub_id}{config} split {self.split}"


def load_math_records(source: MathSource) -> list[dict[str, Any]]:
    """Read, check and map every row of `source` to a record (see the module docstring).

    Raises:
        DataError: the file is missing, unreadable or empty; a row is not an object, lacks a field or
            has an empty one; the hub dataset cannot be loaded (offline and not cached, unknown id).
    """
    records = []
    for index, (where, row) in enumerate(_rows(source)):
        if source.limit is not None and index >= source.limit:
            break
        records.append(_record(source, where, index, row))
    if not records:
        raise DataError(f"{source.describe()}: no rows (config '{source.key}')")
    return records


def normalize_answer(value: Any) -> str | None:
    """A reference answer as text: integral floats lose their ".0", lists are joined with ", ".

    Returns None for a missing or empty answer.
    """
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, tuple)):
        parts = [normalize_answer(item) for item in value]
        if not parts or any(part is None for part in parts):
            return None
        return ", ".join(parts)  # type: ignore[arg-type]
    text = str(value).strip()
    return text or None


def _record(source: MathSource, where: str, index: int, row: Any) -> dict[str, Any]:
    from eopd.tasks.math_grader import extract_boxed

    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for field in (source.prompt_field, source.answer_field):
        if field not in row:
            raise DataError(
                f"{where}: missing field '{field}' (the row has: {', '.join(map(str, row)) or 'nothing'}); "
                f"set {source.key}.prompt_field / {source.key}.answer_field to the fields that hold the "
                "question and the answer"
            )
    question = row[source.prompt_field]
    if not isinstance(question, str) or not question.strip():
        raise DataError(
            f"{where}: field '{source.prompt_field}' must be non-empty text, got {question!r:.60}"
        )
    if source.prompt_pattern is not None:
        match = re.search(source.prompt_pattern, question, flags=re.DOTALL)
        if match is not None:
            question = match.group(1)
    raw_answer = row[source.answer_field]
    if source.answer_from_boxed:
        raw_answer = extract_boxed(str(raw_answer)) if raw_answer is not None else None
        if raw_answer is None:
            raise DataError(f"{where}: field '{source.answer_field}' has no \\boxed{{...}} answer")
    answer = normalize_answer(raw_answer)
    if answer is None:
        raise DataError(f"{where}: field '{source.answer_field}' is empty")
    problem_id = row.get(source.id_field) if source.id_field else None
    return {
        "id": str(problem_id) if problem_id is not None else str(index),
        "prompt": f"{question}{source.suffix}",
        "question": question,
        "answer": answer,
    }


def _rows(source: MathSource) -> Iterator[tuple[str, Any]]:
    """(where, row) pairs: "file:line" for JSONL, "file row i" for Parquet and hub rows (1-based)."""
    if source.path:
        path = Path(source.path).expanduser()
        if not path.is_file():
            raise DataError(f"config '{source.key}.path'={source.path}: no such file")
        if path.suffix in JSONL_SUFFIXES:
            yield from _jsonl_rows(path)
        elif path.suffix in PARQUET_SUFFIXES:
            yield from _parquet_rows(path)
        else:
            raise DataError(
                f"config '{source.key}.path'={source.path}: unknown file type {path.suffix!r}; "
                f"use one of {', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)}"
            )
        return
    for number, row in enumerate(_hub_rows(source), start=1):
        yield f"{source.describe()} row {number}", row


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue  # blank lines (a trailing newline) are not rows
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{path}:{number}: not valid JSON ({error.msg}); each line must be one JSON object"
                ) from None
            yield f"{path}:{number}", row


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow: pip install 'eopd[data]'") from None
    try:
        table = pq.read_table(path)
    except Exception as error:  # noqa: BLE001 - pyarrow raises several types for unreadable files
        raise DataError(f"{path}: not a readable Parquet file ({error})") from None
    for number, row in enumerate(table.to_pylist(), start=1):
        yield f"{path} row {number}", row


def _hub_rows(source: MathSource):
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"config '{source.key}': loading {source.hub_id} from the hub needs the datasets library: "
            f"pip install 'eopd[data]', or set {source.key}.path to a local JSONL or Parquet file"
        ) from None
    try:
        return datasets.load_dataset(source.hub_id, source.hub_config, split=source.split)
    except Exception as error:  # noqa: BLE001 - offline, unknown id, unknown split: one message for all
        raise DataError(
            f"config '{source.key}': cannot load {source.describe()} from the hub "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); download it "
            f"while online (HF_HUB_OFFLINE unset) or set {source.key}.path to a local JSONL or Parquet file"
        ) from None
