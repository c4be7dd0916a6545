"""The embedded multi-path task: generation, splits, reference sampling, grading and ideal entropies."""

import itertools
import math
import random
from collections import Counter, defaultdict

import pytest

from eopd.metrics import pass_at_k_curve
from eopd.tasks.multipath import (
    Problem,
    canonical_solution,
    grade,
    ideal_high_entropy_fraction,
    ideal_token_entropies,
    make_splits,
    next_term_distribution,
    one_branch_fraction,
    reference_solution,
    solution_path,
    solution_text,
    valid_paths,
)

END = "<end>"


@pytest.fixture(scope="module")
def splits():
    return make_splits(seed=0, n_train=2000, n_val=100, n_test=100)


def test_same_seed_gives_same_problems_and_different_seeds_differ(splits):
    assert make_splits(seed=0, n_train=2000, n_val=100, n_test=100) == splits
    other = make_splits(seed=1, n_train=2000, n_val=100, n_test=100)
    for split in ("train", "val", "test"):
        assert [p.terms for p in other[split]] != [p.terms for p in splits[split]]


def test_splits_have_the_requested_sizes_and_unique_ids_and_prompts(splits):
    assert {name: len(problems) for name, problems in splits.items()} == {
        "train": 2000,
        "val": 100,
        "test": 100,
    }
    every_problem = [problem for problems in splits.values() for problem in problems]
    assert len({problem.id for problem in every_problem}) == len(every_problem)
    for problems in splits.values():
        assert len({problem.prompt for problem in problems}) == len(problems)


def test_splits_are_disjoint_by_content_not_only_by_prompt(splits):
    contents = {name: {problem.content_key for problem in problems} for name, problems in splits.items()}
    assert not contents["train"] & contents["val"]
    assert not contents["train"] & contents["test"]
    assert not contents["val"] & contents["test"]
    # The evaluation splits see one content per problem while enough contents exist.
    assert len(contents["test"]) == 100


def test_test_split_does_not_change_with_the_training_set_size(splits):
    assert make_splits(seed=0, n_train=10, n_val=100, n_test=100)["test"] == splits["test"]


def test_problems_use_the_requested_sizes_and_modulus():
    problems = make_splits(seed=3, n_train=200, n_val=20, n_test=20, sizes=(3, 4), modulus=7)["train"]
    assert {len(problem.terms) for problem in problems} == {3, 4}
    assert all(problem.modulus == 7 and max(problem.terms) < 7 for problem in problems)
    assert all(problem.prompt.startswith("add mod 7: ") for problem in problems)


def test_a_split_can_use_every_order_of_every_content_and_no_more():
    # Six pairs with 2 orders each and four triples with 6 orders each: 36 distinct prompts in all.
    train = make_splits(seed=0, n_train=36, n_val=0, n_test=0, sizes=(2, 3), modulus=4)["train"]
    assert len({problem.terms for problem in train}) == 36
    with pytest.raises(ValueError, match="orders"):
        make_splits(seed=0, n_train=37, n_val=0, n_test=0, sizes=(2, 3), modulus=4)


def test_make_splits_rejects_impossible_requests():
    with pytest.raises(ValueError, match="orders"):
        make_splits(seed=0, n_train=100, n_val=0, n_test=0, sizes=(2,), modulus=3)
    with pytest.raises(ValueError, match="sizes"):
        make_splits(seed=0, n_train=10, n_val=1, n_test=1, sizes=(11,))
    with pytest.raises(ValueError, match="counts"):
        make_splits(seed=0, n_train=-1, n_val=1, n_test=1)


def test_problem_rejects_invalid_terms():
    for terms, modulus in [((3, 3, 5), 10), ((1,), 10), ((4, 10), 10), ((1, 2), 11)]:
        with pytest.raises(ValueError):
            Problem(id="bad", terms=terms, modulus=modulus)


def test_problem_prompt_and_answer():
    problem = Problem(id="p", terms=(3, 5, 2, 7, 1))
    assert problem.prompt == "add mod 10: 3 5 2 7 1"
    assert problem.answer == "8"
    assert problem.num_paths == 120
    assert solution_text(problem, (3, 5, 2, 7, 1)) == "3+5=8+2=0+7=7+1=8#8"
    with pytest.raises(ValueError, match="permutation"):
        solution_text(problem, (3, 5, 2, 7))


def test_every_reference_solution_is_correct_and_takes_a_valid_path(splits):
    rng = random.Random(0)
    for problem in splits["train"][:300] + splits["val"] + splits["test"]:
        text = reference_solution(problem, rng)
        path = solution_path(problem, text)
        assert grade(problem, text)
        assert grade(problem, text, check_steps=False)
        assert path is not None and sorted(path) == sorted(problem.terms)
        assert text == solution_text(problem, path)
        assert len(text) <= 60


def test_solution_path_names_each_valid_path_once():
    problem = Problem(id="p", terms=(4, 0, 9, 2))
    paths = [solution_path(problem, solution_text(problem, order)) for order in valid_paths(problem)]
    assert len(set(paths)) == problem.num_paths == 24
    assert set(paths) == set(itertools.permutations(problem.terms))


@pytest.mark.parametrize("terms", [(7, 1, 4), (2, 8, 5, 0)])
def test_reference_solutions_are_uniform_over_paths(terms):
    problem = Problem(id="p", terms=terms)
    draws_per_path = 400
    rng = random.Random(1234)
    counts = Counter(
        solution_path(problem, reference_solution(problem, rng))
        for _ in range(draws_per_path * problem.num_paths)
    )
    assert set(counts) == set(valid_paths(problem))
    chi_square = sum((count - draws_per_path) ** 2 / draws_per_path for count in counts.values())
    # Critical values at p = 0.001: 20.5 for 5 degrees of freedom, 49.7 for 23.
    assert chi_square < {3: 20.5, 4: 49.7}[len(terms)]


def test_wrong_responses_are_rejected():
    problem = Problem(id="p", terms=(3, 5, 2))  # answer 0
    assert grade(problem, "3+5=8+2=0#0")
    wrong = [
        "3+5=8+2=0#1",  # wrong answer after right steps
        "3+5=8+2=1#1",  # wrong running total
        "3+5=8+5=3#3",  # a term used twice, one missing
        "3+5=8#8",  # a term missing
        "3+5=8+2=0+4=4#4",  # a term that is not in the problem
        "3+5=8+2=0+0=0#0",  # an extra term
    ]
    for response in wrong:
        assert not grade(problem, response), response
        assert solution_path(problem, response) is None, response
    # Answer-only grading accepts a right answer after wrong steps, the way a math grader would.
    assert grade(problem, "3+5=9+2=0#0", check_steps=False)
    assert not grade(problem, "3+5=9+2=0#0")
    assert not grade(problem, "3+5=8+2=0#1", check_steps=False)
    assert not grade(problem, "3+5=8+2=0#", check_steps=False)
    assert not grade(problem, "3+5=8+2=0", check_steps=False)
    assert not grade(problem, "<|im_end|>3+5=8+2=0#0", check_steps=False)


def test_end_tokens_and_whitespace_around_a_solution_are_ignored():
    problem = Problem(id="p", terms=(3, 5, 2))
    assert grade(problem, " 2+3=5+5=0#0\n<|im_end|>3+5=8#8")
    assert solution_path(problem, "2+3=5+5=0#0<|endoftext|>") == (2, 3, 5)


@pytest.mark.parametrize(
    "response",
    ["", "#", "0", "#0", "3+5=8+2=0#", "3+5=8+2=0#00", "3+5=8+2=0#0#0", "3++5=8+2=0#0", "3 + 5 = 8 + 2 = 0 # 0",
     "é+5=8+2=0#0", "\\boxed{0}", "3+5=8+2=0#0" * 50, "<|im_end|>3+5=8+2=0#0", "+5=8+2=0#0"],
)  # fmt: skip
def test_malformed_responses_are_rejected_without_exceptions(response):
    problem = Problem(id="p", terms=(3, 5, 2))
    assert not grade(problem, response)
    assert solution_path(problem, response) is None
    assert isinstance(grade(problem, response, check_steps=False), bool)


def _brute_force_entropies(problem: Problem) -> dict[str, list[float]]:
    """Entropy of the next token after every prefix of every solution, from all n! equally likely texts."""
    texts = [[*solution_text(problem, order), END] for order in valid_paths(problem)]
    continuations = defaultdict(Counter)
    for tokens in texts:
        for position, token in enumerate(tokens):
            continuations[tuple(tokens[:position])][token] += 1
    entropies = {}
    for tokens in texts:
        per_token = []
        for position in range(len(tokens)):
            counts = continuations[tuple(tokens[:position])]
            total = sum(counts.values())
            per_token.append(-sum(count / total * math.log(count / total) for count in counts.values()))
        entropies["".join(tokens[:-1])] = per_token
    return entropies


@pytest.mark.parametrize("terms", [(6, 1), (9, 0, 4), (1, 2, 3, 4), (8, 3, 0, 6, 5)])
def test_ideal_token_entropies_match_the_reference_distribution(terms):
    problem = Problem(id="p", terms=terms)
    ideal = ideal_token_entropies(problem)
    for text, entropies in _brute_force_entropies(problem).items():
        assert len(ideal) == len(text) + 1
        assert ideal == pytest.approx(entropies, abs=1e-12), text


@pytest.mark.parametrize(
    ("terms", "before"), [((9, 0, 4), (4, 9)), ((1, 2, 3, 4), (3, 1)), ((8, 3, 0, 6, 5), (8, 5))]
)
def test_ideal_token_entropies_with_a_precedence_match_brute_force(terms, before):
    problem = Problem(id="p", terms=terms, before=before)
    brute = _brute_force_entropies(problem)
    assert len(brute) == problem.num_paths == math.factorial(len(terms)) // 2
    for text, entropies in brute.items():
        assert ideal_token_entropies(problem, solution_path(problem, text)) == pytest.approx(
            entropies, abs=1e-12
        )
    # The expected high-entropy fraction is the mean over the (equally likely) valid paths.
    for tau in (0.5, 0.8, 1.2):
        mean_high = sum(sum(h >= tau for h in e) for e in brute.values()) / len(brute)
        assert ideal_high_entropy_fraction([problem], tau) == pytest.approx(mean_high / (4 * len(terms)))


def test_a_precedence_makes_some_branches_dead_ends():
    problem = Problem(id="p", terms=(3, 5, 2, 7, 1), before=(7, 3))
    assert problem.prompt == "add mod 10, 7 before 3: 3 5 2 7 1"
    assert grade(problem, "5+7=2+3=5+2=7+1=8#8")
    assert not grade(problem, "3+5=8+2=0+7=7+1=8#8")  # 3 comes before 7: the prompt's own order
    assert grade(problem, "3+5=8+2=0+7=7+1=8#8", check_steps=False)  # answer-only grading ignores the path
    assert not problem.is_valid_order(problem.terms)
    assert (
        problem.num_paths == sum(o.index(7) < o.index(3) for o in itertools.permutations(problem.terms)) == 60
    )
    # Taking 3 while 7 is unused is a dead end; 7 opens every order of the rest, so it is twice as likely.
    first = next_term_distribution(problem, ())
    assert (
        3 not in first and first[7] == pytest.approx(2 * first[5]) and sum(first.values()) == pytest.approx(1)
    )
    assert next_term_distribution(problem, (7,)) == pytest.approx({t: 0.25 for t in (1, 2, 3, 5)})
    for bad in [(3, 3), (3, 9), (3,)]:
        with pytest.raises(ValueError, match="before"):
            Problem(id="p", terms=(3, 5, 2), before=bad)


def test_fork_splits_keep_the_plain_terms_and_draw_each_precedence_direction_equally(splits):
    forks = make_splits(seed=0, n_train=2000, n_val=100, n_test=100, before=True)
    for name in ("train", "val", "test"):
        assert [p.terms for p in forks[name]] == [p.terms for p in splits[name]]
        assert all(p.before is not None and set(p.before) <= set(p.terms) for p in forks[name])
    assert 0.45 <= one_branch_fraction(forks["train"]) <= 0.55


def _oracle_pass_at_8(problems, choose, seed=0):
    """Pass@8 of a sampler with perfect arithmetic whose branch choices come from `choose(problem, prefix, rng)`."""
    rng = random.Random(seed)
    correct = []
    for problem in problems:
        row = []
        for _ in range(8):
            order: list[int] = []
            while len(order) < len(problem.terms):
                order.append(choose(problem, tuple(order), rng))
            row.append(grade(problem, solution_text(problem, order)))
        correct.append(row)
    return pass_at_k_curve(correct)[8]


def test_a_sampler_that_always_takes_one_branch_solves_fewer_test_problems_in_8_samples_than_the_teachers_spread():
    # The default task, as conf/data/embedded.yaml configures it for training and the final evaluation.
    from pathlib import Path

    from omegaconf import OmegaConf

    from eopd.data import load_records

    data = OmegaConf.to_container(
        OmegaConf.load(Path(__file__).parents[2] / "conf" / "data" / "embedded.yaml")
    )
    test = [record["problem"] for record in load_records(data)["test"]]
    assert len(test) == 128 and all(problem.before is not None for problem in test)

    def one_branch(problem, prefix, rng):  # the prompt's order: the canonical path
        return problem.terms[len(prefix)]

    def teachers_spread(problem, prefix, rng):  # the reference (teacher's) distribution at every fork
        distribution = next_term_distribution(problem, prefix)
        return rng.choices(list(distribution), weights=list(distribution.values()))[0]

    def blind_spread(problem, prefix, rng):  # uniform over unused terms, the precedence ignored
        return rng.choice([t for t in problem.terms if t not in prefix])

    one = _oracle_pass_at_8(test, one_branch)
    assert one == one_branch_fraction(test)
    assert 0.4 <= one <= 0.7
    assert all(grade(p, canonical_solution(p)) == p.is_valid_order(p.terms) for p in test)
    assert _oracle_pass_at_8(test, teachers_spread) == 1.0
    # Spreading over the branches helps even without knowing which ones are dead ends.
    assert _oracle_pass_at_8(test, blind_spread) >= one + 0.3


def test_ideal_high_entropy_fraction_is_near_the_papers_teacher(splits):
    # n terms give n - 2 choices among at least three (entropy >= ln 3) in 4n tokens.
    for size in (4, 5, 6, 7):
        problem = Problem(id="p", terms=tuple(range(size)))
        assert ideal_high_entropy_fraction([problem]) == pytest.approx((size - 2) / (4 * size))
    fraction = ideal_high_entropy_fraction(splits["train"])
    assert 0.15 <= fraction <= 0.20
    # The gate counts entropy >= tau: a branch between exactly three terms is inside at tau = ln 3.
    three_terms = Problem(id="p", terms=(0, 1, 2))
    assert ideal_high_entropy_fraction([three_terms], tau=math.log(3)) == pytest.approx(1 / 12)
    assert ideal_high_entropy_fraction([three_terms], tau=math.log(3) + 1e-9) == 0.0
    with pytest.raises(ValueError):
        ideal_high_entropy_fraction([])
