"""Math answer extraction and math-verify grading: equal forms accepted, wrong or missing answers rejected."""

import threading

import pytest

from eopd.tasks.math_grader import extract_boxed, grade_math


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so the answer is \boxed{17}.", "17"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"first \boxed{1}, finally \boxed{\sqrt{\frac{a}{b}}} done", r"\sqrt{\frac{a}{b}}"),
        (r"\boxed {x^{2}}", "x^{2}"),
        (r"\fbox{3}", "3"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        ("no answer here", None),
        (r"\boxed{\frac{1}{2}", None),
        (r"\boxed", None),
    ],
)
def test_extract_boxed_takes_the_last_box_with_nested_braces(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    ("response", "gold"),
    [
        (r"\boxed{\frac{1}{2}}", "0.5"),
        (r"\boxed{0.5}", r"\frac{1}{2}"),
        (r"\boxed{1/2}", r"\frac{1}{2}"),
        (r"\boxed{\dfrac{1}{2}}", "1/2"),
        (r"We get \boxed{17}.", "17"),
        (r"\boxed{17}", r"\boxed{17}"),
        (r"\boxed{x^{2}+1}", "1+x^2"),
        (r"\boxed{\sqrt{2}}", r"\sqrt2"),
        (r"2+2 is \boxed{3} no wait \boxed{4}", "4"),
    ],
)
def test_equal_answers_are_accepted(response, gold):
    assert grade_math(response, gold)


@pytest.mark.parametrize(
    ("response", "gold"),
    [
        (r"\boxed{\frac{3}{4}}", r"\frac{1}{2}"),
        (r"\boxed{-3}", "3"),
        (r"\boxed{18}", "17"),
        (r"\boxed{4} no wait \boxed{3}", "4"),
        ("I do not know.", "17"),
        ("", "17"),
        (r"\boxed{}", "17"),
    ],
)
def test_wrong_or_missing_answers_are_rejected(response, gold):
    assert not grade_math(response, gold)
    assert not grade_math(response, gold, require_boxed=False)


def test_plain_answers_count_only_when_boxes_are_not_required():
    assert not grade_math("The answer is 17", "17")
    assert grade_math("The answer is 17", "17", require_boxed=False)
    assert grade_math("The answer is 0.5", r"\frac{1}{2}", require_boxed=False)
    # An unclosed box is no answer when boxes are required; math-verify's own extraction is lenient.
    assert not grade_math(r"\boxed{\frac{1}{2}", "0.5")


def test_grading_works_off_the_main_thread():
    results = []
    worker = threading.Thread(
        target=lambda: results.extend([grade_math(r"\boxed{0.5}", "1/2"), grade_math(r"\boxed{2}", "1/2")])
    )
    worker.start()
    worker.join()
    assert results == [True, False]
