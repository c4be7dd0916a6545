"""The bootstrap over problems within seeds: its interval against the standard error it estimates."""

import math

import numpy as np
import pytest

from eopd.bootstrap import bootstrap_over_problems


def test_bootstrap_interval_is_the_sampling_spread_of_the_mean_over_problems_and_seeds():
    # 4 seeds x 400 problems of 0/1 values: the replicates' spread is the standard error of the mean over
    # seeds of per-seed means, sqrt(sum_s var_s / P) / S, so the 95% interval is mean ± 1.96 of it.
    rng = np.random.default_rng(1)
    per_seed = [(rng.random(400) < p).astype(float) for p in (0.2, 0.4, 0.5, 0.7)]
    mean = float(np.mean([v.mean() for v in per_seed]))
    se = math.sqrt(sum(v.var() / len(v) for v in per_seed)) / len(per_seed)

    interval = bootstrap_over_problems(per_seed)

    assert interval.mean == mean and interval.problems == (400,) * 4
    assert interval.low == pytest.approx(mean - 1.96 * se, abs=0.1 * se)
    assert interval.high == pytest.approx(mean + 1.96 * se, abs=0.1 * se)
    assert bootstrap_over_problems(per_seed) == interval  # a fixed seed: the same report every time
    assert bootstrap_over_problems(per_seed, confidence=0.5).high < interval.high


def test_each_seed_resamples_its_problems_independently():
    values = (np.random.default_rng(2).random(400) < 0.5).astype(float)

    one = bootstrap_over_problems([values])
    two = bootstrap_over_problems([values, values])  # the same outcomes in two seeds

    # Independent draws per seed halve the variance of the mean over seeds; shared draws would not.
    assert two.mean == one.mean
    assert two.high - two.low == pytest.approx((one.high - one.low) / math.sqrt(2), rel=0.1)
