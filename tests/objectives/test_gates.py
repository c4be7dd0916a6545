"""Gates: which tokens open, how many, and that they are detached and reproducible."""

import math

import pytest
import torch

from eopd.objectives import HardGate, NoGate, QuantileGate, RandomGate, SoftGate
from eopd.schedules import Linear

ENTROPY = torch.tensor([[0.1, 0.8, 0.79, 2.0], [1.5, 0.0, 0.9, 3.0]])
MASK = torch.tensor([[True, True, True, True], [True, True, True, False]])


def test_hard_gate_is_teacher_entropy_at_or_above_tau():
    expected = torch.tensor([[0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 0.0]])  # >= tau, masked out at [1, 3]
    assert torch.equal(HardGate(0.8)(ENTROPY, MASK), expected)
    assert HardGate(math.inf)(ENTROPY, MASK).sum() == 0


def test_no_gate_opens_every_valid_token():
    assert torch.equal(NoGate()(ENTROPY, MASK), MASK.float())


def test_soft_gate_is_a_sigmoid_and_tends_to_the_hard_gate():
    soft = SoftGate(0.8, width=0.1)(ENTROPY, MASK)
    expected = torch.sigmoid((ENTROPY - 0.8) / 0.1) * MASK
    torch.testing.assert_close(soft, expected)
    sharp = SoftGate(0.8, width=1e-4)(ENTROPY, MASK)
    off_threshold = (ENTROPY - 0.8).abs() > 1e-2
    assert torch.equal(sharp[off_threshold].round(), HardGate(0.8)(ENTROPY, MASK)[off_threshold])


def test_quantile_gate_opens_the_top_fraction_by_entropy():
    gate = QuantileGate(q=3 / 7)(ENTROPY, MASK)  # 7 valid tokens -> 3 open: entropies 2.0, 1.5, 0.9
    assert int(gate.sum()) == 3
    assert sorted(ENTROPY[gate.bool()].tolist()) == pytest.approx([0.9, 1.5, 2.0])
    assert gate[1, 3] == 0  # the masked 3.0 never opens


def test_random_gate_matches_the_count_of_its_reference_and_is_reproducible():
    g = torch.Generator().manual_seed(0)
    entropy = torch.rand(8, 50, generator=g) * 2
    mask = torch.rand(8, 50, generator=g) > 0.2
    reference = HardGate(0.8)(entropy, mask)
    gate = RandomGate(HardGate(0.8), seed=3)
    drawn = gate(entropy, mask, step=5)
    assert int(drawn.sum()) == int(reference.sum())
    assert (drawn[~mask] == 0).all()
    assert torch.equal(drawn, gate(entropy, mask, step=5))
    assert not torch.equal(drawn, gate(entropy, mask, step=6))
    # Placement is independent of entropy: the opened tokens' mean entropy is near the batch mean.
    assert float(entropy[drawn.bool()].mean()) == pytest.approx(float(entropy[mask].mean()), abs=0.15)


def test_tau_can_follow_a_schedule():
    gate = HardGate(Linear(start=0.0, end=10.0, steps=10))
    assert gate(ENTROPY, MASK, step=0).sum() == MASK.sum()
    assert gate(ENTROPY, MASK, step=10).sum() == 0


def test_gate_arguments_are_validated():
    with pytest.raises(ValueError, match="tau=.*-1"):
        HardGate(-1.0)
    with pytest.raises(ValueError, match="width=0"):
        SoftGate(0.8, width=0)
    with pytest.raises(ValueError, match="q=.*1.5"):
        QuantileGate(1.5)
