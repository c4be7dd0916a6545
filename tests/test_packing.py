"""Scoring on packed rows (`eopd.scoring.Packing`): the hidden states and gradients of the padded batch."""

import copy

import pytest
import torch

from eopd.models import build_causal_lm
from eopd.scoring import Packing, final_hidden_states, packable

# Left-padded prompts followed by right-padded responses: real tokens form one run per row, of lengths
# 9, 3, 6, 2, 7 in a width of 10, so first-fit decreasing fits them in 3 rows of 9.
MASK = torch.tensor(
    [
        [0, 1, 1, 1, 1, 1, 1, 1, 1, 1],
        [0, 0, 0, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 1, 1],
        [0, 0, 1, 1, 1, 1, 1, 1, 1, 0],
    ]
)


def ids_for(mask: torch.Tensor, vocab: int = 50) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, mask.shape, generator=generator).masked_fill(mask == 0, 0)


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def model(request):
    return build_causal_lm(
        family=request.param, vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, seed=0
    )


def test_the_plan_places_every_real_token_once_in_fewer_rows():
    packing = Packing.plan(MASK)
    assert packing is not None and packing.shape == (3, 9)
    placed = set(zip(packing.packed_rows.tolist(), packing.packed_columns.tolist(), strict=True))
    assert len(placed) == int(MASK.sum())  # no two tokens share a place
    # Each sequence stays in one packed row, in order, with position ids 0 .. n - 1.
    for row in range(MASK.shape[0]):
        mine = packing.rows == row
        assert packing.packed_rows[mine].unique().numel() == 1
        assert packing.offsets[mine].tolist() == list(range(int(MASK[row].sum())))
        assert torch.equal(
            packing.packed_columns[mine], packing.packed_columns[mine][0] + packing.offsets[mine]
        )
    ids = ids_for(MASK)
    assert torch.equal(packing.pack(ids)[packing.packed_rows, packing.packed_columns], ids[MASK.bool()])


def test_nothing_is_packed_when_it_saves_less_than_a_fifth_of_the_positions():
    def mask(*lengths: int, width: int) -> torch.Tensor:  # left-padded rows of these lengths
        return torch.tensor([[0] * (width - n) + [1] * n for n in lengths])

    assert Packing.plan(mask(4, 4, 4, width=4)) is None  # nothing padded
    assert Packing.plan(mask(4, 3, width=4)) is None  # 4 + 3 > 4: two rows of 4 again
    assert Packing.plan(mask(9, 9, width=10)) is None  # two rows of 9 instead of 10: a tenth saved
    assert Packing.plan(mask(4, 4, width=5)).shape == (2, 4)  # exactly a fifth saved
    assert Packing.plan(mask(3, 3, width=4)).shape == (2, 3)
    assert Packing.plan(mask(6, 3, 3, width=6)).shape == (2, 6)  # the two short rows share one row


def test_the_mask_keeps_attention_causal_and_inside_each_sequence():
    packing = Packing.plan(MASK)
    positions, mask = packing.position_ids_and_mask()
    sequence = torch.full(packing.shape, -1)
    sequence[packing.packed_rows, packing.packed_columns] = packing.rows
    for n in range(packing.shape[0]):
        for q in range(packing.shape[1]):
            for k in range(packing.shape[1]):
                same = sequence[n, q] == sequence[n, k] and sequence[n, q] >= 0
                assert bool(mask[n, 0, q, k]) == ((same and k <= q) or k == q)
    assert torch.equal(positions[packing.packed_rows, packing.packed_columns], packing.offsets)


def test_packed_hidden_states_and_gradients_equal_the_padded_batch(model):
    """In float64, where the other order of the sums over positions costs ~1e-16, not float32's ~1e-5."""
    assert packable(model)
    model = copy.deepcopy(model).double()
    ids = ids_for(MASK)
    real = MASK.bool()
    outputs = {}
    for pack in (False, True):
        model.zero_grad()
        hidden = final_hidden_states(model, ids, MASK, pack=pack)
        assert hidden.shape == (*MASK.shape, 32)
        (hidden[real] ** 2).sum().backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        outputs[pack] = hidden[real].detach(), grads
    (plain, plain_grads), (packed, packed_grads) = outputs[False], outputs[True]
    torch.testing.assert_close(packed, plain, rtol=1e-12, atol=1e-12)
    assert plain_grads.keys() == packed_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-10, atol=1e-12, msg=name)


def test_packed_float32_hidden_states_agree_to_rounding(model):
    ids = ids_for(MASK)
    with torch.no_grad():
        plain, packed = (
            final_hidden_states(model, ids, MASK, pack=pack)[MASK.bool()] for pack in (False, True)
        )
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)


def test_only_models_whose_mask_path_takes_the_block_mask_are_packed(model, monkeypatch):
    assert packable(model)
    for key, value in [
        ("_attn_implementation", "flex_attention"),
        ("_attn_implementation", "eager"),
        ("layer_types", ["sliding_attention", "full_attention"]),
        ("model_type", "gpt2"),
    ]:
        with monkeypatch.context() as patch:
            patch.setattr(model.config, key, value, raising=False)
            assert not packable(model), key
    # pack=True on a model that is not packable scores the padded batch itself.
    ids = ids_for(MASK)
    plain = final_hidden_states(model, ids, MASK).detach()
    monkeypatch.setattr("eopd.scoring.packable", lambda model: False)
    monkeypatch.setattr(Packing, "plan", lambda mask: pytest.fail("a packing was planned"))
    assert torch.equal(final_hidden_states(model, ids, MASK, pack=True).detach(), plain)
