"""Pure mixing math: CFG, CDM mix, access-policy normalisation, prior, sparse routing; import rule."""
import math

import pytest
import torch

from prompt_cdm.core.mixing import guidance, guided_mix, mix, normalize, prior_logits, sparsify

torch.set_num_threads(1)


def rows(n=3, N=2, shape=(4, 2, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, N, *shape, generator=g)


def test_guidance_formula():
    u, c = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])
    assert torch.allclose(guidance(u, c, 2.5), torch.tensor([1 + 2.5 * 2, 2 + 2.5 * -3]))


def test_mix_by_hand():
    e = rows()
    w = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    out = mix(e, w)
    assert out.shape == (2, 4, 2, 2)
    assert torch.allclose(out[0], 0.2 * e[0, 0] + 0.3 * e[1, 0] + 0.5 * e[2, 0])
    assert torch.equal(out[1], e[0, 1])  # one source at weight 1 is that source exactly


def test_guided_mix_by_hand():
    e, u = rows(), rows(1)[0]
    w = torch.tensor([[0.2, 0.3, 0.5], [0.1, 0.6, 0.3]])
    g = 7.5
    for b in range(2):
        want = u[b] + g * (sum(w[b, i] * e[i, b] for i in range(3)) - u[b])
        assert torch.allclose(guided_mix(u, e, w, g)[b], want, atol=1e-5)
    assert torch.allclose(guided_mix(u, e, w, 1.0), mix(e, w))  # g = 1: no guidance


def test_mix_shape_errors():
    with pytest.raises(ValueError, match=r"\[n x N"):
        mix(rows(n=3, N=2), torch.ones(3, 2) / 2)
    with pytest.raises(ValueError, match=r"\[N x n\]"):
        mix(rows(), torch.ones(3))


def test_normalize_over_allowed_subset():
    w = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.2, 0.2]])
    out = normalize(w, torch.tensor([True, False, True]))
    assert torch.allclose(out, torch.tensor([[0.2 / 0.7, 0.0, 0.5 / 0.7], [0.75, 0.0, 0.25]]))
    per_image = torch.tensor([[False, True, False], [True, True, True]])
    out = normalize(w, per_image)
    assert torch.allclose(out, torch.tensor([[0.0, 1.0, 0.0], [0.6, 0.2, 0.2]]))
    assert torch.allclose(normalize(torch.tensor([2.0, 2.0])), torch.tensor([0.5, 0.5]))


def test_normalize_logits_is_masked_softmax():
    z = torch.tensor([[0.0, math.log(3.0), 5.0]])
    out = normalize(z, torch.tensor([True, True, False]), logits=True)
    assert torch.allclose(out, torch.tensor([[0.25, 0.75, 0.0]]))


@pytest.mark.parametrize("w, allowed, msg", [
    ([0.5, 0.5], [False, False], "no source is allowed"),
    ([0.0, 0.0], None, "positive"),
    ([0.0, 1.0], [True, False], "positive"),
    ([-0.1, 1.1], None, "non-negative"),
    ([float("nan"), 1.0], None, "non-negative"),
])
def test_normalize_refuses(w, allowed, msg):
    with pytest.raises(ValueError, match=msg):
        normalize(torch.tensor(w), None if allowed is None else torch.tensor(allowed))


def test_normalize_refuses_all_minus_inf_logits():
    with pytest.raises(ValueError, match="positive"):
        normalize(torch.tensor([-math.inf, 0.0]), torch.tensor([True, False]), logits=True)


def test_prior_logits():
    z = prior_logits([1.0, 3.0, 0.0])
    assert torch.allclose(z.exp(), torch.tensor([0.25, 0.75, 0.0]))
    assert z[2] == -math.inf
    assert torch.allclose(prior_logits([2, 2]).exp(), torch.tensor([0.5, 0.5]))  # ints accepted
    for bad, msg in [([0.0, 0.0], "positive sum"), ([1.0, -1.0], "non-negative"),
                     ([1.0, float("inf")], "non-negative"), ([], "n >= 1")]:
        with pytest.raises(ValueError, match=msg):
            prior_logits(bad)


def test_sparsify_no_dropping_during_warmup():
    w = torch.tensor([[0.9, 0.09, 0.01]])
    act = torch.ones(1, 3, dtype=torch.bool)
    for step in range(5):  # warmup_frac 0.5 of 10 steps: steps 0..4
        out, a = sparsify(w, act, eps=0.05, step=step, n_steps=10, warmup_frac=0.5)
        assert a.all() and torch.allclose(out, w)
    out, a = sparsify(w, act, eps=0.05, step=5, n_steps=10, warmup_frac=0.5)
    assert a.tolist() == [[True, True, False]]
    assert torch.allclose(out, torch.tensor([[0.9 / 0.99, 0.09 / 0.99, 0.0]]))


def test_sparsify_keeps_at_least_one_and_never_revives():
    w = torch.tensor([[0.4, 0.3, 0.3], [0.2, 0.5, 0.3]])
    out, a = sparsify(w, torch.ones(2, 3, dtype=torch.bool), eps=0.9, step=0, n_steps=4,
                      warmup_frac=0.0)
    assert a.tolist() == [[True, False, False], [False, True, False]]  # the argmax survives
    assert torch.equal(out, a.float())
    # later the dropped sources' weights rise: they stay dropped, and the argmax rule only picks
    # among active sources
    w2 = torch.tensor([[0.01, 0.98, 0.01], [0.9, 0.05, 0.05]])
    out2, a2 = sparsify(w2, a, eps=0.1, step=1, n_steps=4, warmup_frac=0.0)
    assert torch.equal(a2, a) and torch.equal(out2, a.float())
    # the access mask works the same way: a disallowed source is never used, even in warm-up
    out3, a3 = sparsify(w2, torch.tensor([False, True, True]), eps=0.0, step=0, n_steps=4,
                        warmup_frac=1.0)
    assert out3[:, 0].eq(0).all() and not a3[:, 0].any()


def test_sparse_equals_dense_when_dropped_weights_are_zero():
    """Parity (STYLE habit 9): dropping sources whose weight is exactly 0 changes nothing."""
    e, u = rows(n=4, N=3), rows(1, N=3)[0]
    w = torch.tensor([[0.5, 0.0, 0.5, 0.0], [0.0, 0.0, 1.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    sw, a = sparsify(w, torch.ones_like(w, dtype=torch.bool), eps=1e-6, step=3, n_steps=4,
                     warmup_frac=0.5)
    assert a.tolist() == [[True, False, True, False], [False, False, True, False], [True] * 4]
    assert torch.equal(sw, w)
    assert torch.equal(guided_mix(u, e, sw, 5.0), guided_mix(u, e, w, 5.0))
    # and the rows of dropped sources may hold anything (they are not computed any more)
    e_sparse = torch.where(a.t().reshape(4, 3, 1, 1, 1), e, torch.full_like(e, 123.0))
    e_sparse[:, 2] = e[:, 2]  # image 2 keeps all four sources
    assert torch.allclose(mix(e_sparse, sw), mix(e, w))


def test_sparsify_validates():
    w = torch.ones(1, 2) / 2
    with pytest.raises(ValueError, match="warmup_frac"):
        sparsify(w, torch.ones(1, 2, dtype=torch.bool), 0.1, 0, 4, 1.5)
    with pytest.raises(ValueError, match="boolean"):
        sparsify(w, torch.ones(1, 2), 0.1, 0, 4, 0.5)


