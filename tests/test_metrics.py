"""Pass@k, Avg@k, Maj@k and distinct paths, checked against brute force and hand-worked examples."""

import itertools

import numpy as np
import pytest

from eopd.metrics import avg_at_k, distinct_correct_paths, maj_at_k, pass_at_k, pass_at_k_curve


def _brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of the k-subsets of n samples (the first c correct) that hold at least one correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(index < c for index in subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_equals_enumeration_over_all_subsets(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_brute_force_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_edge_cases():
    assert pass_at_k(10, 0, 3) == 0.0
    assert pass_at_k(10, 10, 3) == 1.0
    assert pass_at_k(8, 1, 8) == 1.0  # k = n: at least one correct among all samples
    assert pass_at_k(8, 0, 8) == 0.0
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)
    assert pass_at_k(np.int64(4), np.int64(2), 2) == pytest.approx(5 / 6)
    # Large n stays finite and accurate where C(n, k) would overflow a float.
    assert pass_at_k(5000, 1, 2500) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("n", "c", "k"), [(4, 2, 5), (4, 2, 0), (4, 5, 1), (4, -1, 1), (0, 0, 1), (4.0, 2, 1)]
)
def test_pass_at_k_rejects_impossible_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_pass_at_k_error_names_the_problem_when_k_exceeds_n():
    with pytest.raises(ValueError, match=r"pass@9 cannot be estimated from 8 samples"):
        pass_at_k(8, 2, 9)


def test_avg_at_k_is_mean_correctness():
    assert avg_at_k([True, False, False, True]) == 0.5
    assert avg_at_k(np.array([1, 1, 1, 0])) == 0.75
    with pytest.raises(ValueError):
        avg_at_k([])


def test_pass_at_k_curve_averages_over_problems():
    matrix = [[True, False, False, False], [False, False, False, False], [True, True, True, True]]
    curve = pass_at_k_curve(matrix)
    assert list(curve) == [1, 2, 3, 4]
    assert curve[1] == pytest.approx((0.25 + 0 + 1) / 3)
    assert curve[2] == pytest.approx((0.5 + 0 + 1) / 3)
    assert curve[4] == pytest.approx((1 + 0 + 1) / 3)
    assert all(curve[k] <= curve[k + 1] for k in range(1, 4))
    assert pass_at_k_curve(np.array(matrix)) == curve
    with pytest.raises(ValueError, match="same number"):
        pass_at_k_curve([[True, False], [True]])
    with pytest.raises(ValueError):
        pass_at_k_curve([])


def test_maj_at_k_on_a_hand_example():
    answers = ["7", "3", None, "3", "7", "7"]
    correct = [True, False, False, False, True, True]
    assert maj_at_k(answers, correct, k=1)  # "7" alone
    assert maj_at_k(answers, correct, k=2)  # tie 7:3, "7" came first
    assert not maj_at_k(answers, correct, k=4)  # "3" twice, "7" once; None does not vote
    assert maj_at_k(answers, correct, k=5)  # tie 2:2, "7" came first
    assert maj_at_k(answers, correct, k=6)  # "7" three times
    assert not maj_at_k(["3", "7"], [False, True], k=2)  # tie goes to the earlier, wrong "3"
    assert not maj_at_k([None, None], [False, False], k=2)


def test_maj_at_k_rejects_inconsistent_inputs():
    with pytest.raises(ValueError, match="flags"):
        maj_at_k(["1", "2"], [True], k=1)
    with pytest.raises(ValueError, match="k must"):
        maj_at_k(["1", "2"], [True, False], k=3)
    with pytest.raises(ValueError, match="both correct and wrong"):
        maj_at_k(["1", "1"], [True, False], k=2)


def test_distinct_correct_paths_counts_different_correct_paths_only():
    assert distinct_correct_paths([(1, 2, 3), None, (2, 1, 3), (1, 2, 3), None]) == 2
    assert distinct_correct_paths([None, None]) == 0
    assert distinct_correct_paths([]) == 0
