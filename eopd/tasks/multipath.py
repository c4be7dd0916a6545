"""The embedded multi-path task: add distinct digits modulo 10 in any order, one running total per step.

A problem is a list of distinct residues, e.g. the prompt `add mod 10: 3 5 2 7 1`. A solution picks an
order of the terms and writes the running total after each one, then the answer after `#`:

    3+5=8+2=0+7=7+1=8#8          (order 3, 5, 2, 7, 1)
    7+1=8+5=3+3=6+2=8#8          (order 7, 1, 5, 3, 2)

Read `a+b=c+d=e` as "a plus b is c; c plus d is e": each `=c` is the total so far, modulo 10. Every order
of the terms is a valid path, so a problem with n terms has n! solution paths, all with the same answer.

This is the structure the paper's method is about, made exact. Under the reference sampler (uniform over
orders) the next token is uncertain only where a term is chosen: the k-th choice is uniform over the
n - k terms left, with entropy ln(n - k) nats (ln 3 = 1.10 and above pass the paper's tau = 0.8; ln 2 =
0.69 does not). Every other token (operators, totals, the answer, the end token) is certain. With the
default sizes of 5 to 7 terms about 16% of response tokens are branch points, close to the 18.5% the
paper measured for its math teacher (`ideal_high_entropy_fraction`).

The fork variant (`before`): a problem may also require one term to come before another, e.g.
`add mod 10, 7 before 3: 3 5 2 7 1`. Then a path is valid only if 7 is added before 3, so at a fork where
3 is still unused before 7, taking 3 is a dead end: `3+5=8+...` can no longer be completed validly, while
`5+7=2+3=5+2=7+1=8#8` is valid. The prompt's own order is a valid path for half of the problems; a model
that always adds the terms in the order shown (one branch) fails the other half on every sample, while
one that spreads over the valid branches as the teacher does solves all of them within a few samples.
This is the variant the default pair and `make train` use (conf/data/embedded.yaml): forks whose choice
decides correctness. See `one_branch_fraction` and docs/task.md.

Tokens here are characters, as in `eopd.tasks.tokenizer`, plus one end-of-response token.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache

MODULUS = 10
DEFAULT_SIZES = (5, 6, 7)
ANSWER_MARK = "#"
SPLITS = ("train", "val", "test")

_SOLUTION = re.compile(r"(\d)((?:\+\d=\d)+)#(\d)")
_STEP = re.compile(r"\+(\d)=(\d)")


@dataclass(frozen=True)
class Problem:
    """One problem: distinct residues to add modulo `modulus`, in the order the prompt shows them.

    Attributes:
        id: unique within its split, e.g. "test-00042".
        terms: the residues, distinct, each in [0, modulus), at least two.
        modulus: at most 10, so every term and total is one digit (one token).
        before: (first, second): two of the terms, `first` to be added before `second` (the fork
            variant), or None for the plain task.
    """

    id: str
    terms: tuple[int, ...]
    modulus: int = MODULUS
    before: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if not 2 <= self.modulus <= 10:
            raise ValueError(f"modulus must lie in [2, 10] (one digit per number), got {self.modulus}")
        if len(self.terms) < 2:
            raise ValueError(f"a problem needs at least two terms, got {self.terms}")
        if len(set(self.terms)) != len(self.terms):
            raise ValueError(f"terms must be distinct, got {self.terms}")
        if not all(isinstance(term, int) and 0 <= term < self.modulus for term in self.terms):
            raise ValueError(f"terms must be integers in [0, {self.modulus}), got {self.terms}")
        rule = self.before
        if rule is not None and (len(rule) != 2 or rule[0] == rule[1] or not set(rule) <= set(self.terms)):
            raise ValueError(f"before must be two different terms of {self.terms}, got {rule!r}")

    @property
    def prompt(self) -> str:
        """The user message, e.g. `add mod 10: 3 5 2 7 1`, or `add mod 10, 7 before 3: 3 5 2 7 1`."""
        rule = "" if self.before is None else f", {self.before[0]} before {self.before[1]}"
        return f"add mod {self.modulus}{rule}: " + " ".join(map(str, self.terms))

    @property
    def answer(self) -> str:
        """The final answer as it appears after `#`: the sum of the terms modulo `modulus`."""
        return str(sum(self.terms) % self.modulus)

    @property
    def content_key(self) -> tuple[int, ...]:
        """What makes two problems the same problem: the set of terms, whatever order the prompt shows."""
        return tuple(sorted(self.terms))

    @property
    def num_paths(self) -> int:
        """Number of valid solution paths: every order of the terms, or half of them with `before`."""
        return _completions(frozenset(self.terms), self.before)

    def is_valid_order(self, order: Sequence[int]) -> bool:
        """Whether adding the terms in `order` is a valid path: a permutation that respects `before`."""
        if sorted(order) != sorted(self.terms):
            return False
        return self.before is None or list(order).index(self.before[0]) < list(order).index(self.before[1])


def _completions(remaining: frozenset[int], before: tuple[int, int] | None) -> int:
    """Valid orders of the `remaining` terms: all of them, or half when both terms of `before` remain."""
    count = math.factorial(len(remaining))
    return count // 2 if before is not None and set(before) <= remaining else count


def next_term_distribution(problem: Problem, prefix: Sequence[int]) -> dict[int, float]:
    """The reference sampler's distribution of the next term after the terms in `prefix`.

    The reference sampler is uniform over valid paths, so a term's probability is its share of the valid
    completions: with no `before` that is uniform over the unused terms; with one, the second term has
    probability 0 while the first is unused (a dead end), and the first is twice as likely as each other
    term (taking it opens every order of the rest, taking another keeps half of them).
    """
    return _next_terms(frozenset(problem.terms) - set(prefix), problem.before)


def _next_terms(remaining: frozenset[int], before: tuple[int, int] | None) -> dict[int, float]:
    weights = {}
    for term in sorted(remaining):
        if before is not None and term == before[1] and before[0] in remaining:
            continue  # a dead end: the first term of `before` could no longer come first
        weights[term] = _completions(remaining - {term}, before)
    norm = sum(weights.values())
    return {term: weight / norm for term, weight in weights.items()}


def solution_text(problem: Problem, order: Sequence[int]) -> str:
    """Write the solution that adds the terms in `order`, e.g. `3+5=8+2=0#0` for order (3, 5, 2).

    Raises:
        ValueError: if `order` is not a permutation of the problem's terms.
    """
    if sorted(order) != sorted(problem.terms):
        raise ValueError(f"order {tuple(order)} is not a permutation of the terms {problem.terms}")
    total = order[0]
    text = str(order[0])
    for term in order[1:]:
        total = (total + term) % problem.modulus
        text += f"+{term}={total}"
    return f"{text}{ANSWER_MARK}{total}"


def valid_paths(problem: Problem) -> Iterator[tuple[int, ...]]:
    """Every valid solution path (an order of the terms); up to n! of them, so only for small problems."""
    return (order for order in itertools.permutations(problem.terms) if problem.is_valid_order(order))


def reference_solution(problem: Problem, rng: random.Random) -> str:
    """Sample a reference solution uniformly over the valid paths.

    The order is `rng.sample(terms, n)`, a uniformly random permutation, redrawn until it is valid (with
    `before` set, half the draws are); since the terms are distinct, different orders give different
    texts, so the text is uniform over the valid solution texts.

    Args:
        problem: the problem to solve.
        rng: the source of randomness; the same state gives the same solution.

    Returns:
        The solution text, without any end token.
    """
    return solution_text(problem, reference_order(problem, rng))


def reference_order(problem: Problem, rng: random.Random) -> tuple[int, ...]:
    """The path `reference_solution` writes: uniformly random permutations redrawn until one is valid."""
    while True:
        order = tuple(rng.sample(problem.terms, len(problem.terms)))
        if problem.is_valid_order(order):
            return order


def term_positions(n: int) -> list[int]:
    """Where a solution of n terms writes each term: `t0 + t1 = s + t2 = s ...` puts them at 0, 2, 6, 10, ..."""
    return [0, *(2 + 4 * step for step in range(n - 1))]


def forks_along(problem: Problem, tokens: Sequence[str]) -> list[tuple[int, dict[int, float]]]:
    """The forks along one response: (token index, `next_term_distribution` there) at every term choice
    with at least two valid terms.

    The response is followed along its own choices while it keeps the solution format (`+` before a term,
    `=` and a one-digit total before the next `+`) and picks a term the reference sampler could pick; the
    first fork where it does not is still returned (the choice there is what is measured), none after it.

    Args:
        tokens: the response's token strings, one character each (the embedded tokenizer's).
    """
    found: list[tuple[int, dict[int, float]]] = []
    prefix: list[int] = []
    for k, position in enumerate(term_positions(len(problem.terms))):
        if position >= len(tokens):
            break
        if k >= 1 and tokens[position - 1] != "+":
            break
        if k >= 2 and not (tokens[position - 3] == "=" and tokens[position - 2].isdigit()):
            break
        distribution = next_term_distribution(problem, prefix)
        if len(distribution) >= 2:
            found.append((position, distribution))
        token = tokens[position]
        if not (len(token) == 1 and token.isdigit() and int(token) in distribution):
            break
        prefix.append(int(token))
    return found


def canonical_solution(problem: Problem) -> str:
    """The one-branch solution: the terms added in the order the prompt shows them, `before` ignored.

    What a student that learnt a single path per problem writes. With `before` set it is invalid whenever
    the prompt shows the second term before the first (half of the problems).
    """
    return solution_text(problem, problem.terms)


def _strip_response(response: str) -> str:
    # Generation may leave its end token or trailing whitespace in the text; nothing after it counts.
    for end_token in ("<|im_end|>", "<|endoftext|>"):
        response = response.split(end_token, 1)[0]
    return response.strip()


def solution_path(problem: Problem, response: str) -> tuple[int, ...] | None:
    """Which valid path a correct response took: its order of the terms, or None if it is not a valid solution.

    A response is valid when it has the solution format, uses every term exactly once, every running total
    is right, the order respects the problem's `before`, and the answer after `#` equals the last total
    and the problem's answer. Text after an end
    token (`<|im_end|>` or `<|endoftext|>`) and surrounding whitespace are ignored. Never raises on
    malformed text.

    Returns:
        The order of the terms, e.g. (3, 5, 2), hashable, so distinct paths can be counted.
    """
    match = _SOLUTION.fullmatch(_strip_response(response))
    if match is None:
        return None
    steps = [(int(term), int(total)) for term, total in _STEP.findall(match.group(2))]
    order = (int(match.group(1)), *(term for term, _ in steps))
    if sorted(order) != sorted(problem.terms):
        return None
    total = order[0]
    for term, written_total in steps:
        total = (total + term) % problem.modulus
        if written_total != total:
            return None
    if int(match.group(3)) != total:
        return None
    if not problem.is_valid_order(order):
        return None
    return order


def grade(problem: Problem, response: str, *, check_steps: bool = True) -> bool:
    """Grade a response exactly.

    Args:
        problem: the problem the response answers.
        response: the generated text (end tokens and trailing text after them are ignored).
        check_steps: True (default): the response must be a valid solution (see `solution_path`), so a
            lucky final answer after wrong steps fails. False: only the answer after the last `#` must
            equal the problem's answer, as a math grader would check.

    Returns:
        Whether the response is correct. Malformed text is graded False, never raises.
    """
    if check_steps:
        return solution_path(problem, response) is not None
    text = _strip_response(response)
    if ANSWER_MARK not in text:
        return False
    return text.rsplit(ANSWER_MARK, 1)[1].strip() == problem.answer


def ideal_token_entropies(problem: Problem, order: Sequence[int] | None = None) -> list[float]:
    """Entropy (nats) of the true next-token distribution at every token of one solution, under the reference sampler.

    The reference sampler is uniform over the valid paths (`reference_solution`). At the token that writes
    the k-th term the next term follows `next_term_distribution`: with no `before` it is uniform over the
    n - k unused terms, entropy ln(n - k); with `before` it depends on the path so far. Every other token
    (operators, totals, the answer, the end token) is determined by the tokens before it: entropy 0.
    `tests/tasks/test_multipath.py` checks this against the conditional distribution computed by brute
    force from all valid solution texts.

    Args:
        problem: the problem.
        order: the path whose tokens to score; None takes the prompt's order, which must then be valid.
            Without `before` the entropies do not depend on the path.

    Returns:
        One entropy per response token: each character of the solution, then the end token (whose
        entropy is 0: after the answer digit the response always ends). Length 4n for n terms.

    Raises:
        ValueError: if `order` is not a valid path.
    """
    order = tuple(problem.terms if order is None else order)
    if not problem.is_valid_order(order):
        raise ValueError(f"{order} is not a valid path of {problem.prompt!r}")
    n = len(order)
    # Layout: t0 + t1 = s + t2 = s ... + t(n-1) = s # a <end>; terms sit at 0, 2, 6, 10, ...
    length = 1 + 4 * (n - 1) + 2 + 1
    entropies = [0.0] * length
    for k, position in enumerate(term_positions(n)):
        entropies[position] = _entropy(next_term_distribution(problem, order[:k]).values())
    return entropies


def _entropy(probs: Iterable[float]) -> float:
    """Entropy in nats; exactly ln(m) for m equal probabilities, so a gate at tau = ln(m) counts them."""
    probs = list(probs)
    if max(probs) - min(probs) < 1e-12:
        return math.log(len(probs))
    return -sum(p * math.log(p) for p in probs)


def _expected_high_forks(problem: Problem, tau: float) -> float:
    """Expected number of branch points with entropy >= tau on a path drawn by the reference sampler."""

    @cache
    def expected(remaining: frozenset[int]) -> float:
        if not remaining:
            return 0.0
        # The next-term distribution depends on the path so far only through the terms left.
        probs = _next_terms(remaining, problem.before)
        value = float(_entropy(probs.values()) >= tau)
        return value + sum(p * expected(remaining - {term}) for term, p in probs.items())

    return expected(frozenset(problem.terms))


def ideal_high_entropy_fraction(problems: Iterable[Problem], tau: float = 0.8) -> float:
    """Fraction of response tokens whose ideal next-token entropy is at least `tau`, over `problems`.

    What a teacher that had learnt the task perfectly would show at tau on its own samples. Token-weighted
    (total high-entropy tokens over total tokens, the way a batch is counted), and exact: every solution
    of a problem has the same length (4n tokens, the end token included), and the expected count of
    high-entropy branch points is summed over the reference sampler's paths exactly.

    Returns:
        The fraction in [0, 1]; 0.163 for the plain task's default splits at tau = 0.8 (5, 6, 7 terms
        give 3/20, 4/24, 5/28).

    Raises:
        ValueError: if `problems` is empty.
    """
    high = 0.0
    total = 0
    for problem in problems:
        high += _expected_high_forks(problem, tau)
        total += 4 * len(problem.terms)
    if total == 0:
        raise ValueError("ideal_high_entropy_fraction needs at least one problem")
    return high / total


def one_branch_fraction(problems: Sequence[Problem]) -> float:
    """Fraction of `problems` whose prompt order is a valid path: what one branch can solve.

    A perfect model that always adds the terms in the order shown solves exactly these problems, on every
    sample, and no other; the teacher's spread solves all of them.
    """
    if not problems:
        raise ValueError("one_branch_fraction needs at least one problem")
    return sum(p.is_valid_order(p.terms) for p in problems) / len(problems)


def _cycle_contents(pool: Sequence[tuple[int, ...]], count: int, split: str) -> list[tuple[int, ...]]:
    """`count` contents from `pool` in rounds, leaving out in each round the contents whose orders are all used."""
    if count > sum(math.factorial(len(content)) for content in pool):
        raise ValueError(
            f"the {split} split asks for {count} problems but its {len(pool)} contents have fewer distinct orders"
        )
    sequence: list[tuple[int, ...]] = []
    for round_index in itertools.count():
        if len(sequence) == count:
            return sequence
        eligible = [content for content in pool if math.factorial(len(content)) > round_index]
        sequence.extend(eligible[: count - len(sequence)])


def make_splits(
    seed: int,
    n_train: int,
    n_val: int,
    n_test: int,
    *,
    sizes: Sequence[int] = DEFAULT_SIZES,
    modulus: int = MODULUS,
    before: bool = False,
) -> dict[str, list[Problem]]:
    """Generate train, validation and test problems, disjoint by content (the set of terms).

    Every set of `size` distinct residues (for each size in `sizes`) is a content; the contents are shuffled
    by `seed`. Test takes the first min(n_test, K // 4) of them, validation the next min(n_val, K // 4),
    train all the rest (K = number of contents: 582 for the defaults), so the evaluation splits see as many
    different contents as possible and train keeps at least half. Each split cycles through its contents,
    showing each time a fresh random order of the terms, and drops a content from the cycle once all its
    orders are shown; prompts are unique within a split.

    The test split depends only on (seed, n_test, sizes, modulus), and validation only on those and n_val,
    so growing the training set leaves the evaluation sets unchanged.

    Args:
        seed: the same seed gives the same problems.
        n_train, n_val, n_test: problems per split (zero allowed).
        sizes: numbers of terms a problem may have, each in [2, modulus].
        modulus: at most 10.
        before: give every problem a precedence between two of its terms (the fork variant), an ordered
            pair drawn uniformly from a stream of its own, so the terms are those of `before=False`.

    Returns:
        {"train": [...], "val": [...], "test": [...]} with ids like "val-00003".

    Raises:
        ValueError: on bad sizes or counts, or when a split asks for more problems than its contents have
            distinct orders.
    """
    counts = {"train": n_train, "val": n_val, "test": n_test}
    if any(not isinstance(count, int) or count < 0 for count in counts.values()):
        raise ValueError(f"problem counts must be non-negative integers, got {counts}")
    if not sizes or any(not 2 <= size <= modulus for size in sizes):
        raise ValueError(f"sizes must be a non-empty list of integers in [2, {modulus}], got {sizes}")

    contents = [
        combination
        for size in sorted(set(sizes))
        for combination in itertools.combinations(range(modulus), size)
    ]
    random.Random(seed).shuffle(contents)
    eval_cap = len(contents) // 4
    n_test_contents = min(n_test, eval_cap)
    n_val_contents = min(n_val, eval_cap)
    pools = {
        "test": contents[:n_test_contents],
        "val": contents[n_test_contents : n_test_contents + n_val_contents],
        "train": contents[n_test_contents + n_val_contents :],
    }

    splits = {}
    for split in SPLITS:
        # A string seed per split keeps each split's draws independent of the other splits' sizes.
        rng = random.Random(f"{seed}/{split}")
        rule_rng = random.Random(f"{seed}/{split}/before")  # its own stream: the terms match before=False
        seen_prompts: set[tuple[int, ...]] = set()
        problems = []
        for index, content in enumerate(_cycle_contents(pools[split], counts[split], split)):
            terms = tuple(rng.sample(content, len(content)))
            while terms in seen_prompts:
                terms = tuple(rng.sample(content, len(content)))
            seen_prompts.add(terms)
            rule = tuple(rule_rng.sample(terms, 2)) if before else None
            problems.append(Problem(id=f"{split}-{index:05d}", terms=terms, modulus=modulus, before=rule))
        splits[split] = problems
    return splits
