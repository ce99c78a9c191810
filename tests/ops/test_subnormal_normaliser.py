"""A bug found by `favor paper books` (FAVOR++ at L = 2,048): in float32 the fast paths
returned +-inf where the normaliser was subnormal, because they multiply by 1 / normaliser,
which overflows below ~2.9e-39. The query's features are shifted by their own row max, so a
query whose dominant features are not the keys' dominant ones gets a normaliser like e^-95;
the float32 reference (explicit L x L kernel) and float64 are finite. The bidirectional fast
path shifts the keys per feature; the causal paths and the step keep each row's largest
feature at 2^HEADROOM (favor.ops.row_features), so such products stay normal."""

from __future__ import annotations

import torch

import favor
from favor.ops.reference import kernel_attention


def _case():
    # phi(q) ~ [1, e^-95] and phi(k) ~ [e^-95, 1] after their row shifts (identity projection,
    # scale 1): the normaliser phi(q).sum_j phi(k_j) ~ 4e^-95 ~ 2e-41 is subnormal in float32
    fm = favor.FeatureMap("positive", projection=torch.eye(2))
    q = torch.tensor([[[95.0, 0.0], [95.0, 0.0]]])
    k = torch.tensor([[[0.0, 95.0], [0.0, 95.0]]])
    v = torch.tensor([[[1.0, -2.0], [3.0, 0.5]]])
    return fm, q, k, v


def test_the_float32_reference_is_finite_on_a_subnormal_normaliser():
    fm, q, k, v = _case()
    ref = kernel_attention(q, k, v, fm, scale=1.0)
    exact = favor.attention(q.double(), k.double(), v.double(), fm.double(), scale=1.0)
    torch.testing.assert_close(ref.double(), exact, rtol=1e-5, atol=1e-6)


def test_bidirectional_fast_path_is_exact_on_a_subnormal_normaliser():
    # one shift per feature for the keys (bidirectional_fast.key_sums_per_feature): the
    # normaliser is >= 1 whatever the spread between q's and k's dominant features
    fm, q, k, v = _case()
    out = favor.attention(q, k, v, fm, scale=1.0)
    exact = favor.attention(q.double(), k.double(), v.double(), fm.double(), scale=1.0)
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-6)


def test_bidirectional_oprf_gradients_are_finite_far_from_the_keys():
    # keys opposite to the queries (FAVOR++, |q| ~ 20): with one shift for all features the
    # float32 fast path returned NaN outputs and gradients here (normaliser ~1e-40); now
    # output and gradients match float64 (several chunks, padding)
    g = torch.Generator().manual_seed(0)
    fm = favor.FeatureMap("oprf", dim=4, num_features=16, generator=g)
    q = torch.randn(2, 3, 40, 4, generator=g) * 10.0
    k = -q.flip(-2) + 0.1 * torch.randn(2, 3, 40, 4, generator=g)
    v = torch.randn(2, 3, 40, 3, generator=g)
    pad = torch.zeros(2, 40, dtype=torch.bool)
    pad[1, 25:] = True
    outs, grads = [], []
    for dtype in (torch.float32, torch.float64):
        leaves = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
        out = favor.attention(*leaves, fm.to(dtype), key_padding_mask=pad, chunk_size=16)
        w = torch.linspace(-1, 1, out.numel(), dtype=dtype).view(out.shape)
        grads.append(torch.autograd.grad((out * w).sum(), leaves))
        outs.append(out.double())
    assert torch.isfinite(outs[0]).all()
    # float32 round-off (6e-8) through exponents of size ~|q| |k| ~ 400: relative ~1e-3
    # measured (outputs 8e-4, gradients 4e-3)
    torch.testing.assert_close(outs[0], outs[1], rtol=5e-3, atol=1e-4)
    for name, a, b in zip("qkv", *grads, strict=True):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.double(), b, rtol=2e-2, atol=1e-3, msg=lambda m, n=name: f"d{n}: {m}")


def test_causal_fast_path_is_finite_on_a_subnormal_normaliser():
    fm, q, k, v = _case()
    out = favor.attention(q, k, v, fm, scale=1.0, causal=True)
    exact = favor.attention(q.double(), k.double(), v.double(), fm.double(), scale=1.0, causal=True)
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-6)


def test_step_and_exact_terms_are_finite_on_a_subnormal_normaliser():
    # the recurrent step and the causal exact-terms path (its far products) share the fix
    fm, q, k, v = _case()
    exact = favor.attention(q.double(), k.double(), v.double(), fm.double(), scale=1.0, causal=True)
    state, outs = None, []
    for t in range(2):
        o, state = favor.step(state, q[:, t], k[:, t], v[:, t], fm, scale=1.0)
        outs.append(o)
    torch.testing.assert_close(torch.stack(outs, 1).double(), exact, rtol=1e-5, atol=1e-6)
    # window 0: key 0 is a far key of query 1 (its weight the features' product, ~e^-95)
    terms = favor.ExactTerms(0)
    out = favor.attention(q, k, v, fm, scale=1.0, causal=True, exact=terms)
    want = favor.attention(q.double(), k.double(), v.double(), fm.double(), scale=1.0, causal=True, exact=terms)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
