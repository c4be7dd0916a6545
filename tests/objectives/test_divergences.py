"""Every divergence against a float64 reference written from its definition, plus its properties."""

import math

import pytest
import torch

from eopd.objectives import (
    forward_kl,
    generalized_jsd,
    reverse_kl,
    sampled_kl,
    sampled_kl_from_logits,
    skew_forward_kl,
    skew_reverse_kl,
    token_entropy,
    topk_forward_kl,
    total_variation,
)

V = 11


def probs64(logits, temperature=1.0):
    """softmax in float64, written out: exp(l / T) / sum exp(l / T)."""
    z = logits.double() / temperature
    e = torch.exp(z - z.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def kl64(p, q):
    return (p * (p.log() - q.log())).sum(-1)


def ref_forward_kl(s, t, T=1.0):
    return kl64(probs64(t, T), probs64(s, T))


def ref_reverse_kl(s, t, T=1.0):
    return kl64(probs64(s, T), probs64(t, T))


def ref_jsd(s, t, beta, T=1.0):
    ps, pt = probs64(s, T), probs64(t, T)
    m = (1 - beta) * ps + beta * pt
    return beta * kl64(pt, m) + (1 - beta) * kl64(ps, m)


def ref_skew_fkl(s, t, alpha, T=1.0):
    ps, pt = probs64(s, T), probs64(t, T)
    return kl64(pt, alpha * pt + (1 - alpha) * ps)


def ref_skew_rkl(s, t, alpha, T=1.0):
    ps, pt = probs64(s, T), probs64(t, T)
    return kl64(ps, alpha * ps + (1 - alpha) * pt)


def ref_tv(s, t, T=1.0):
    return 0.5 * (probs64(s, T) - probs64(t, T)).abs().sum(-1)


def ref_entropy(x, T=1.0):
    p = probs64(x, T)
    return -(p * p.log()).sum(-1)


def ref_topk_fkl(s, t, k, tail, T=1.0):
    """Loop over positions; the set S, the renormalised teacher and the bucket written out by hand."""
    ps, pt = probs64(s, T), probs64(t, T)
    out = torch.empty(s.shape[:-1], dtype=torch.float64)
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in s.shape[:-1]]).reshape(-1, s.dim() - 1):
        idx = tuple(idx.tolist())
        order = sorted(range(V), key=lambda v: -float(t[idx][v]))[:k]
        total = 0.0
        if tail == "renorm":
            z = sum(float(pt[idx][v]) for v in order)
            for v in order:
                q = float(pt[idx][v]) / z
                total += q * (math.log(q) - math.log(float(ps[idx][v])))
        else:
            for v in order:
                total += float(pt[idx][v]) * (math.log(float(pt[idx][v])) - math.log(float(ps[idx][v])))
            tail_t = 1 - sum(float(pt[idx][v]) for v in order)
            tail_s = sum(float(ps[idx][v]) for v in range(V) if v not in order)
            if k < V and tail_t > 0:
                total += tail_t * (math.log(tail_t) - math.log(tail_s))
        out[idx] = total
    return out


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 4, V, generator=g) * 2
    t = torch.randn(3, 4, V, generator=g) * 3
    return s, t


FULL = [
    (forward_kl, ref_forward_kl, {}),
    (reverse_kl, ref_reverse_kl, {}),
    (total_variation, ref_tv, {}),
]
PARAMETRIC = [
    (generalized_jsd, ref_jsd, "beta", [0.1, 0.5, 0.9]),
    (skew_forward_kl, ref_skew_fkl, "alpha", [0.0, 0.1, 0.5]),
    (skew_reverse_kl, ref_skew_rkl, "alpha", [0.0, 0.1, 0.5]),
]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("fn, ref, _", FULL)
def test_full_divergences_match_float64_reference(pair, fn, ref, _, temperature):
    s, t = pair
    got = fn(s, t, temperature=temperature)
    assert got.shape == s.shape[:-1]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref(s, t, temperature), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fn, ref, param, values", PARAMETRIC)
def test_parametric_divergences_match_float64_reference(pair, fn, ref, param, values):
    s, t = pair
    for value in values:
        got = fn(s, t, **{param: value})
        torch.testing.assert_close(got.double(), ref(s, t, value), rtol=1e-5, atol=1e-6)


def test_entropy_matches_reference(pair):
    s, _ = pair
    torch.testing.assert_close(token_entropy(s).double(), ref_entropy(s), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        token_entropy(s, temperature=0.5).double(), ref_entropy(s, 0.5), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("tail", ["renorm", "bucket"])
@pytest.mark.parametrize("k", [1, 4, V])
def test_topk_forward_kl_matches_reference(pair, k, tail):
    s, t = pair
    torch.testing.assert_close(
        topk_forward_kl(s, t, k=k, tail=tail).double(), ref_topk_fkl(s, t, k, tail), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("tail", ["renorm", "bucket"])
def test_topk_with_full_vocabulary_equals_forward_kl(pair, tail):
    s, t = pair
    torch.testing.assert_close(topk_forward_kl(s, t, k=V, tail=tail), forward_kl(s, t), rtol=1e-5, atol=1e-6)


def test_zero_at_identity_and_nonnegative(pair):
    s, t = pair
    for fn in (forward_kl, reverse_kl, total_variation, generalized_jsd, skew_forward_kl, skew_reverse_kl):
        assert fn(s, s).abs().max() < 1e-5, fn.__name__
        assert (fn(s, t) >= -1e-6).all(), fn.__name__
    for tail in ("renorm", "bucket"):
        assert topk_forward_kl(s, s, k=4, tail=tail).abs().max() < 1e-5 if tail == "bucket" else True
        assert (topk_forward_kl(s, t, k=4, tail=tail) >= -1e-6).all()


def test_jsd_endpoints_are_zero_and_symmetric_bound(pair):
    s, t = pair
    assert generalized_jsd(s, t, beta=0.0).abs().max() == 0
    assert generalized_jsd(s, t, beta=1.0).abs().max() == 0
    assert (generalized_jsd(s, t, beta=0.5) <= math.log(2) + 1e-6).all()
    # Near the endpoints the documented limits: JSD/beta -> forward KL, JSD/(1-beta) -> reverse KL.
    eps = 1e-4
    torch.testing.assert_close(generalized_jsd(s, t, beta=eps) / eps, forward_kl(s, t), rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(
        generalized_jsd(s, t, beta=1 - eps) / eps, reverse_kl(s, t), rtol=2e-2, atol=2e-3
    )
    # Endpoints still backpropagate (zero gradient, no error).
    s = s.clone().requires_grad_(True)
    generalized_jsd(s, t, beta=0.0).sum().backward()
    assert s.grad.abs().max() == 0


def test_sampled_estimators_approach_reverse_kl():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(V, generator=g), torch.randn(V, generator=g)
    samples = torch.multinomial(torch.softmax(s, -1), 200_000, replacement=True, generator=g)
    logp_s, logp_t = torch.log_softmax(s, -1)[samples], torch.log_softmax(t, -1)[samples]
    exact = float(reverse_kl(s, t))
    k1 = float(sampled_kl(logp_s, logp_t, estimator="k1").double().mean())
    k3 = float(sampled_kl(logp_s, logp_t, estimator="k3").double().mean())
    assert k1 == pytest.approx(exact, rel=0.03)
    assert k3 == pytest.approx(exact, rel=0.03)
    assert (sampled_kl(logp_s, logp_t, estimator="k3") >= 0).all()
    assert (sampled_kl(logp_s, logp_t, estimator="k2") >= 0).all()


def test_sampled_kl_from_logits_definitions(pair):
    s, t = pair
    tokens = torch.randint(0, V, s.shape[:-1], generator=torch.Generator().manual_seed(3))
    ls = torch.log(probs64(s)).gather(-1, tokens[..., None]).squeeze(-1)
    lt = torch.log(probs64(t)).gather(-1, tokens[..., None]).squeeze(-1)
    k1 = ls - lt
    refs = {"k1": k1, "k2": k1**2 / 2, "k3": (lt - ls).exp() - 1 - (lt - ls)}
    for name, ref in refs.items():
        got = sampled_kl_from_logits(s, t, tokens, estimator=name)
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "fn, kwargs",
    [
        (forward_kl, {}),
        (reverse_kl, {}),
        (generalized_jsd, {"beta": 0.3}),
        (skew_forward_kl, {"alpha": 0.2}),
        (skew_reverse_kl, {"alpha": 0.2}),
        (topk_forward_kl, {"k": 4, "tail": "renorm"}),
        (topk_forward_kl, {"k": 4, "tail": "bucket"}),
    ],
)
def test_gradcheck_small_vocabulary(fn, kwargs):
    g = torch.Generator().manual_seed(2)
    s = torch.randn(2, 6, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 6, generator=g, dtype=torch.float64)
    # The library computes in float32; gradcheck its float32 gradient against float64 finite differences.
    (analytic,) = torch.autograd.grad(fn(s, t, **kwargs).sum(), s)

    def f64(x):
        return fn(x.float(), t.float(), **kwargs).double().sum()

    numeric = torch.zeros_like(s)
    h = 1e-3
    for i in range(s.numel()):
        e = torch.zeros_like(s).view(-1)
        e[i] = h
        e = e.view_as(s)
        numeric.view(-1)[i] = (f64(s.detach() + e) - f64(s.detach() - e)) / (2 * h)
    torch.testing.assert_close(analytic, numeric, rtol=1e-2, atol=1e-3)


def test_bf16_inputs_agree_with_fp32_within_tolerance(pair):
    s, t = pair
    for fn in (forward_kl, reverse_kl, generalized_jsd):
        exact = fn(s, t)
        low = fn(s.bfloat16(), t.bfloat16())
        assert low.dtype == torch.float32  # computed in float32 whatever the input dtype
        # bf16 keeps 8 bits of mantissa: logits of size ~5 are off by ~0.02, so KLs agree to ~5%.
        torch.testing.assert_close(low, exact, rtol=0.05, atol=0.03)


def test_bad_arguments_raise_clear_errors(pair):
    s, t = pair
    with pytest.raises(ValueError, match="vocab size"):
        forward_kl(s, t[..., :-1])
    with pytest.raises(ValueError, match="top_k=12 exceeds the vocabulary size 11"):
        topk_forward_kl(s, t, k=12)
    with pytest.raises(ValueError, match="beta=1.5"):
        generalized_jsd(s, t, beta=1.5)
    with pytest.raises(ValueError, match="alpha=-0.1"):
        skew_forward_kl(s, t, alpha=-0.1)
    with pytest.raises(ValueError, match="temperature=0"):
        forward_kl(s, t, temperature=0)
    with pytest.raises(ValueError, match="tail='other'"):
        topk_forward_kl(s, t, k=2, tail="other")
    with pytest.raises(ValueError, match="estimator='k4'"):
        sampled_kl(s[..., 0], t[..., 0], estimator="k4")
