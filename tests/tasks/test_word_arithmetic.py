"""Tests for eopd.tasks.word_arithmetic: word problems drawn from a seed, graded on free text."""

import re

import pytest

from eopd.evaluation import GRADERS
from eopd.tasks.word_arithmetic import WordTask, make_splits

TASK = WordTask(
    seed=3, n_train=400, n_val=20, n_test=40, max_operand=9, two_step_fraction=0.5, loss_fraction=0.5
)
_NUMBER = re.compile(r"\b\d+\b")


def _solve(prompt: str) -> int:
    """The answer recomputed from the text alone: a total adds every count; a story applies each clause."""
    numbers = [int(n) for n in _NUMBER.findall(prompt)]
    if "in total" in prompt:
        return sum(numbers)
    held = numbers[0]
    clauses = prompt.split(". ", 1)[1].split("How many")[0].split(", then ")
    for clause, amount in zip(clauses, numbers[1:], strict=True):
        held += -amount if (" gives " in clause or " loses " in clause) else amount
    return held


def test_the_same_seed_draws_the_same_problems_and_another_seed_others():
    again = make_splits(TASK)
    assert make_splits(TASK) == again
    other = make_splits(WordTask(**{**TASK.__dict__, "seed": 4}))
    assert [r["prompt"] for r in other["test"]] != [r["prompt"] for r in again["test"]]


def test_every_answer_follows_from_its_text():
    for split in make_splits(TASK).values():
        for record in split:
            assert record["answer"] == str(_solve(record["prompt"])), record["prompt"]


def test_no_prompt_is_shared_between_splits():
    splits = make_splits(TASK)
    assert {name: len(rows) for name, rows in splits.items()} == {"train": 400, "val": 20, "test": 40}
    prompts = [r["prompt"] for rows in splits.values() for r in rows]
    assert len(prompts) == len(set(prompts))


def test_the_difficulty_knobs_do_what_they_say():
    rows = make_splits(WordTask(n_train=2000, n_val=0, n_test=0, two_step_fraction=0.25, loss_fraction=0.0))[
        "train"
    ]
    two_steps = sum(r["steps"] == 2 for r in rows) / len(rows)
    assert 0.2 < two_steps < 0.3
    assert not any(" gives " in r["prompt"] or " loses " in r["prompt"] for r in rows)
    assert all(2 <= int(n) <= 9 for r in rows for n in _NUMBER.findall(r["prompt"]))
    losses = make_splits(WordTask(n_train=500, n_val=0, n_test=0, loss_fraction=1.0, max_operand=5))["train"]
    assert all(int(r["answer"]) >= 1 for r in losses), "a loss never takes all that is held"


def test_a_suffix_follows_the_question():
    rows = make_splits(WordTask(n_train=5, n_val=0, n_test=0, suffix=" Answer in one short sentence."))[
        "train"
    ]
    assert all(r["prompt"].endswith("? Answer in one short sentence.") for r in rows)


def test_too_few_distinct_problems_is_an_error_naming_the_knob(monkeypatch):
    import eopd.tasks.word_arithmetic as task

    monkeypatch.setattr(task, "NAMES", (("Mia", "She"), ("Leo", "He")))
    monkeypatch.setattr(task, "KINDS", {"fruits": ("apples", "pears")})
    with pytest.raises(ValueError, match="data.n_train=500: only .* raise data.max_operand"):
        make_splits(WordTask(n_train=500, n_val=0, n_test=0, max_operand=3, two_step_fraction=0.0))


@pytest.mark.parametrize(
    ("fields", "key"),
    [
        ({"max_operand": 1}, "data.max_operand"),
        ({"n_test": -1}, "data.n_test"),
        ({"loss_fraction": 1.5}, "data.loss_fraction"),
    ],
)
def test_bad_knobs_name_the_key(fields, key):
    with pytest.raises(ValueError, match=key):
        WordTask(**fields)


@pytest.mark.parametrize(
    ("response", "correct"),
    [
        ("Mia has 3 + 4 = 7 apples.", True),
        ("The answer is 7.", True),
        ("She has 7 apples, because 3 and 4 make 7.", True),
        ("Mia has 7 apples and Leo has 2.", False),  # the last number stated is the answer read
        ("So 10 - 3 = 7 and she started with 10.", False),
        ("Mia has \\boxed{7} apples.", True),
        ("I do not know.", False),
    ],
)
def test_free_text_answers_are_graded_on_the_stated_number(response, correct):
    grader = GRADERS["math_text"]()
    assert grader.grade({"answer": "7"}, response) is correct
    assert grader.answer_is_correct({"answer": "7"}, grader.answer({"answer": "7"}, response)) is correct
