"""Arithmetic word problems in natural language, generated offline from a seed, graded on free text.

A problem is one or two operations on small whole numbers, told about a person and some objects:

    Ben has 5 peaches and 3 bananas. How many fruits does Ben have in total?            (one step: 8)
    Ivy has 4 tulips. She gives away 2 tulips, then she finds 3 more tulips. How many tulips does Ivy
    have now?                                                                           (two steps: 5)

The answer is a whole number; a response is graded by math-verify on its free text (no `\\boxed{}`
needed: the last number stated, `eopd.tasks.math_grader.grade_math` with `require_boxed=False`), so a
chat model answering in its own words is graded as it writes. Records carry "id", "prompt", "answer"
and "steps" (1 or 2), like the math data's records, so the rest of the pipeline reads them unchanged.

`make_splits` draws train, validation and test problems from one seed with no prompt shared between
splits. The difficulty (`WordTask`: the operand range, the share of two-step and of subtraction
problems) is chosen so that the real pair's teacher solves part of it (docs/real.md).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SPLITS = ("train", "val", "test")

NAMES = (
    ("Mia", "She"), ("Leo", "He"), ("Ana", "She"), ("Sam", "He"), ("Lily", "She"), ("Tom", "He"),
    ("Emma", "She"), ("Ben", "He"), ("Zoe", "She"), ("Max", "He"), ("Ivy", "She"), ("Jack", "He"),
    ("Nora", "She"), ("Eli", "He"), ("Ruby", "She"), ("Owen", "He"),
)  # fmt: skip
# Objects by kind: a total over several kinds asks for the kind's name ("How many fruits ...").
KINDS = {
    "fruits": ("apples", "pears", "plums", "oranges", "bananas", "peaches"),
    "toys": ("toy cars", "dolls", "balls", "kites", "robots", "puzzles"),
    "pets": ("cats", "dogs", "rabbits", "fish", "birds", "hamsters"),
    "flowers": ("roses", "tulips", "daisies", "lilies", "sunflowers", "violets"),
}
# One clause per operation of a story; {p} is the pronoun.
_GAIN = ("{p} gets {n} more {things}", "{p} buys {n} more {things}", "{p} finds {n} more {things}")
_LOSS = ("{p} gives {n} {things} to {friend}", "{p} loses {n} {things}", "{p} gives away {n} {things}")


@dataclass(frozen=True)
class WordTask:
    """The task's difficulty and split sizes; every field enters the problems drawn.

    Attributes:
        seed: draws every problem.
        n_train, n_val, n_test: problems per split, no prompt shared between splits.
        max_operand: operands are drawn from 2..max_operand; a loss always leaves at least one.
        two_step_fraction: share of problems with two operations.
        loss_fraction: share of operations that take away (subtraction) rather than add.
        suffix: text after the question, e.g. an instruction on how to answer.
    """

    seed: int = 0
    n_train: int = 2000
    n_val: int = 32
    n_test: int = 64
    max_operand: int = 9
    two_step_fraction: float = 0.5
    loss_fraction: float = 0.5
    suffix: str = ""

    def __post_init__(self) -> None:
        for name, least in (("n_train", 1), ("max_operand", 2)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"data.{name}={value!r} must be an integer >= {least}")
        for name in ("n_val", "n_test"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"data.{name}={value!r} must be a whole number >= 0")
        for name in ("two_step_fraction", "loss_fraction"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"data.{name}={value!r} must lie in [0, 1]")


def draw_problem(task: WordTask, rng: random.Random) -> tuple[str, int, int]:
    """One problem: (prompt, answer, number of operations).

    A problem with no subtraction is told either as a total over kinds ("3 apples, 2 pears and 4 plums:
    how many fruits?") or as gains ("3 apples; she gets 2 more"); one with a subtraction as a story of
    gains and losses, where a loss never takes all that is held.
    """
    name, pronoun = rng.choice(NAMES)
    kind = rng.choice(sorted(KINDS))
    steps = 2 if rng.random() < task.two_step_fraction else 1
    losses = [rng.random() < task.loss_fraction for _ in range(steps)]
    if not any(losses) and rng.random() < 0.5:
        things = rng.sample(KINDS[kind], steps + 1)
        counts = [rng.randint(2, task.max_operand) for _ in things]
        listed = ", ".join(f"{n} {t}" for n, t in zip(counts[:-1], things[:-1], strict=True))
        held = f"{listed} and {counts[-1]} {things[-1]}"
        return (
            f"{name} has {held}. How many {kind} does {name} have in total?{task.suffix}",
            sum(counts),
            steps,
        )
    things = rng.choice(KINDS[kind])
    friend = rng.choice([other for other, _ in NAMES if other != name])
    start = held = rng.randint(2, task.max_operand)
    clauses = []
    for step, loss in enumerate(losses):
        loss = loss and held > 2  # a loss takes at least 2 and leaves at least 1
        amount = rng.randint(2, min(task.max_operand, held - 1)) if loss else rng.randint(2, task.max_operand)
        held += -amount if loss else amount
        subject = pronoun if step == 0 else pronoun.lower()
        template = rng.choice(_LOSS if loss else _GAIN)
        clauses.append(template.format(p=subject, n=amount, friend=friend, things=things))
    action = clauses[0] + (f", then {clauses[1]}" if steps == 2 else "")
    question = f"How many {things} does {name} have now?"
    return f"{name} has {start} {things}. {action}. {question}{task.suffix}", held, steps


def make_splits(task: WordTask) -> dict[str, list[dict]]:
    """Train, validation and test records drawn from `task.seed`; no prompt appears in two splits.

    Returns:
        split name -> records {"id", "prompt", "answer" (a string), "steps"}; an empty split is left out.
    """
    rng = random.Random(task.seed)
    seen: set[str] = set()
    sizes = {"test": task.n_test, "val": task.n_val, "train": task.n_train}  # held-out splits first
    splits: dict[str, list[dict]] = {}
    for split, count in sizes.items():
        rows: list[dict] = []
        attempts = 0
        while len(rows) < count:
            attempts += 1
            if attempts > 20 * count + 1000:  # the pool of distinct prompts is nearly used up
                raise ValueError(
                    f"data.n_{split}={count}: only {len(rows)} distinct problems could be drawn at "
                    f"max_operand={task.max_operand}; raise data.max_operand or lower the split sizes"
                )
            prompt, answer, steps = draw_problem(task, rng)
            if prompt in seen:
                continue
            seen.add(prompt)
            rows.append(
                {"id": f"{split}-{len(rows):05d}", "prompt": prompt, "answer": str(answer), "steps": steps}
            )
        if rows:
            splits[split] = rows
    return {name: splits[name] for name in SPLITS if name in splits}
