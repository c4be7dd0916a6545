"""Schedules of objective weights and thresholds over optimizer steps."""

import pytest

from eopd.schedules import Constant, Cosine, Linear, Step, as_schedule, schedule_range


def test_values_at_key_steps():
    assert Constant(0.5)(100) == 0.5
    lin = Linear(start=1.0, end=0.0, steps=10, begin=5)
    assert [lin(s) for s in (0, 5, 10, 15, 99)] == [1.0, 1.0, 0.5, 0.0, 0.0]
    cos = Cosine(start=1.0, end=0.0, steps=10)
    assert cos(0) == pytest.approx(1.0) and cos(5) == pytest.approx(0.5) and cos(10) == pytest.approx(0.0)
    step = Step(values=[1.0, 0.5, 0.1], boundaries=[10, 20])
    assert [step(s) for s in (0, 9, 10, 19, 20)] == [1.0, 1.0, 0.5, 0.5, 0.1]


def test_numbers_wrap_and_ranges():
    assert as_schedule(2) == Constant(2.0)
    assert schedule_range(Linear(3.0, -1.0, 5)) == (-1.0, 3.0)
    assert schedule_range(Step([1.0, 4.0], [3])) == (1.0, 4.0)


def test_bad_schedules_raise():
    with pytest.raises(ValueError, match="steps=0"):
        Linear(1.0, 0.0, steps=0)
    with pytest.raises(ValueError, match="one more entry"):
        Step(values=[1.0], boundaries=[5])
    with pytest.raises(TypeError, match="expected a number or a schedule"):
        as_schedule("fast")
