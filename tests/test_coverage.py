"""Coverage apart from accuracy: the even-spread reference for distinct paths and the KL at forks, each
against a reference written from its definition."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from eopd.coverage import ForkKL, expected_distinct_paths
from eopd.evaluation import EmbeddedGrader, EvalSpec, ModelSide, evaluate
from eopd.tasks.multipath import Problem, forks_along, next_term_distribution
from eopd.tasks.tokenizer import build_tokenizer
from tests.test_pretrain_evaluate import embedded_records


@pytest.mark.parametrize("num_paths, correct", [(1, 3), (2, 2), (6, 4), (3, 0)])
def test_expected_distinct_paths_is_the_mean_over_every_equally_likely_draw(num_paths, correct):
    draws = list(itertools.product(range(num_paths), repeat=correct))
    exact = sum(len(set(draw)) for draw in draws) / len(draws)
    assert expected_distinct_paths(num_paths, correct) == pytest.approx(exact)


def test_forks_follow_the_response_while_it_stays_valid():
    plain = Problem("p", (3, 5, 2))
    forks = forks_along(plain, list("3+5=8+2=0#0"))
    assert [position for position, _ in forks] == [0, 2]  # the last term is forced: no fork
    assert forks[1][1] == next_term_distribution(plain, [3]) == {2: 0.5, 5: 0.5}

    ruled = Problem("q", (3, 5, 2, 7), before=(7, 3))
    assert [p for p, _ in forks_along(ruled, list("7+3=0+5=5+2=7#7"))] == [0, 2, 6]
    dead_end = forks_along(ruled, list("3+7=0+5=5+2=7#7"))  # 3 before 7: no valid completion
    assert [p for p, _ in dead_end] == [0]  # the choice at 0 is measured, nothing after it
    assert forks_along(plain, list("3-5")) == [(0, next_term_distribution(plain, []))]  # format broken


def test_the_fork_kl_is_zero_for_the_tasks_own_branching_and_the_definition_otherwise():
    tokenizer = build_tokenizer()
    problem = Problem("p", (3, 5, 2, 7))
    record = {"problem": problem}
    response = tokenizer.encode("5+2=7+3=0+7=7#7", add_special_tokens=False)
    forks = forks_along(problem, tokenizer.convert_ids_to_tokens(response))
    vocab = len(tokenizer)

    def exact(where):  # logits that give the task's own next-term distribution
        rows = torch.full((len(where), vocab), -1e9, dtype=torch.float64)
        for row, (_, position) in enumerate(where):
            distribution = dict(forks)[position]
            for term, q in distribution.items():
                rows[row, tokenizer.convert_tokens_to_ids(str(term))] = math.log(q)
        return rows

    matched = ForkKL()
    matched.add(EmbeddedGrader(), [record], [response], exact, tokenizer, temperature=1.0)
    assert matched.metrics() == {"forks/count": 3.0, "forks/kl": pytest.approx(0.0, abs=1e-9)}

    uniform = ForkKL()  # every vocabulary entry equally likely
    uniform.add(EmbeddedGrader(), [record], [response], lambda w: torch.zeros(len(w), vocab), tokenizer, 1.0)
    reference = sum(sum(q * math.log(q * vocab) for q in d.values()) for _, d in forks) / len(forks)
    assert uniform.metrics()["forks/kl"] == pytest.approx(reference, rel=1e-12)


def test_evaluate_reports_coverage_for_the_embedded_task_only():
    from eopd.data import PromptFormat
    from eopd.models import build_causal_lm
    from tests.test_pretrain_evaluate import Always

    tokenizer = build_tokenizer()
    model = build_causal_lm(vocab_size=len(tokenizer), hidden_size=16, num_layers=1, num_heads=2, seed=0)
    side = ModelSide(model, tokenizer, PromptFormat(suffix="\n"), (tokenizer.eos_token_id,))
    spec = EvalSpec(n_samples=2, max_new_tokens=6, batch_size=3)
    records = embedded_records(4)
    metrics = evaluate(side, records, EmbeddedGrader(), spec, vocab_size=len(tokenizer)).metrics
    assert metrics["paths/even_spread"] == 0.0  # a random model solves nothing: no correct sample
    assert metrics["forks/count"] >= 1 and metrics["forks/kl"] > 0
    other = evaluate(side, records, Always(True), spec, vocab_size=len(tokenizer)).metrics
    assert "forks/kl" not in other and "paths/even_spread" not in other
