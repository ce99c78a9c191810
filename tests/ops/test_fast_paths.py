"""The chunked custom-autograd paths (bidirectional_fast, causal_fast, the row-wise
feature functions) against their references: the simple paths bidirectional /
causal_chunked and the explicit L x L kernel_attention. Exact identities, so tight
tolerances: float64 1e-10, float32 1e-5 (outputs and gradients)."""

from __future__ import annotations

import math

import pytest
import torch

import favor
from favor.ops import api
from favor.ops import causal_fast as causal_fast_module
from favor.ops.bidirectional import bidirectional
from favor.ops.bidirectional_fast import bidirectional_fast
from favor.ops.causal import causal_chunked
from favor.ops.causal_fast import causal_fast
from favor.ops.row_features import row_features

KERNELS = ["positive", "hyperbolic", "oprf", "relu", "elu", "trig"]


def _map(kernel: str, d: int = 8, m: int = 16, dtype=torch.float64, **kw) -> favor.FeatureMap:
    if kernel == "elu":
        return favor.FeatureMap("elu", dim=d, **kw).to(dtype)
    return favor.FeatureMap(kernel, dim=d, num_features=m, generator=torch.Generator().manual_seed(7), **kw).to(dtype)


def _qkv(gen, shape=(2, 3, 23, 8), dtype=torch.float64, std=1.0):
    return [
        (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dtype).requires_grad_() for _ in range(3)
    ]


def _mask(b: int, length: int) -> torch.Tensor:
    m = torch.zeros(b, length, dtype=torch.bool)
    m[1, length - 6 :] = True  # the second sequence ends in padding
    m[0, 2] = True  # and a hole early in the first
    return m


def _close(got: torch.Tensor, want: torch.Tensor, tol: float, *, relative: bool = False) -> None:
    # trig features make the normaliser nearly cancel for some rows, so outputs and
    # gradients reach 1e5 on unit inputs; there the bound is relative to the largest entry
    # (the simple reference paths show the same relative gap to kernel_attention)
    scale = max(1.0, want.abs().max().item()) if relative else 1.0
    err = (got - want).abs().max().item()
    assert err <= tol * scale, f"max error {err:.3e} > {tol:.1e} x {scale:.3e}"


def _reference_path(q, k, v, fm, *, causal, mask, chunk):
    """favor.attention with the fast paths switched off: the simple bidirectional / causal_chunked."""
    keep = api._fast_eligible
    api._fast_eligible = lambda *a: False
    try:
        return favor.attention(q, k, v, fm, causal=causal, key_padding_mask=mask, chunk_size=chunk)
    finally:
        api._fast_eligible = keep


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_fast_equals_references_float64(gen, kernel, causal, chunk):
    fm = _map(kernel)
    q, k, v = _qkv(gen)
    mask = _mask(2, 23)
    out = favor.attention(q, k, v, fm, causal=causal, key_padding_mask=mask, chunk_size=chunk)
    lxl = favor.kernel_attention(q, k, v, fm, causal=causal, key_padding_mask=mask)
    simple = _reference_path(q, k, v, fm, causal=causal, mask=mask, chunk=chunk)
    g = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    grads = torch.autograd.grad(out, (q, k, v), g)
    rel = kernel == "trig"
    for want in (lxl, simple):
        _close(out, want, 1e-10, relative=rel)
        for got_g, want_g in zip(grads, torch.autograd.grad(want, (q, k, v), g), strict=True):
            _close(got_g, want_g, 1e-10, relative=rel)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel", ["positive", "oprf"])
def test_fast_float32_within_1e5_of_float64_reference(gen, causal, kernel):
    fm64 = _map(kernel, d=16, m=32)
    fm32 = _map(kernel, d=16, m=32, dtype=torch.float32)
    q, k, v = _qkv(gen, shape=(2, 2, 70, 16))
    mask = _mask(2, 70)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    out = favor.attention(q32, k32, v32, fm32, causal=causal, key_padding_mask=mask, chunk_size=16)
    want = favor.kernel_attention(q, k, v, fm64, causal=causal, key_padding_mask=mask)
    assert out.dtype == torch.float32
    _close(out.double(), want, 1e-5)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    for got_g, want_g in zip(
        torch.autograd.grad(out, (q32, k32, v32), g.float()), torch.autograd.grad(want, (q, k, v), g), strict=True
    ):
        _close(got_g.double(), want_g, 1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_tiny_float64(gen, causal):
    fm = _map("positive", d=4, m=6)
    q, k, v = _qkv(gen, shape=(2, 1, 7, 4))
    mask = _mask(2, 7)
    feat = row_features(fm)

    def f(q, k, v):
        if causal:
            return causal_fast(q, k, v, feat, key_padding_mask=mask[:, None, :], chunk_size=3)[0]
        return bidirectional_fast(q, k, v, feat, key_padding_mask=mask[:, None, :], chunk_size=3)

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-8)


def test_gradcheck_data_dependent_oprf_and_state(gen):
    """FAVOR++'s A* depends on q and k (bidirectional); the initial state's kv and z get gradients."""
    fm = _map("oprf", d=4, m=6)
    q, k, v = _qkv(gen, shape=(1, 2, 6, 4))
    assert torch.autograd.gradcheck(
        lambda q, k, v: favor.attention(q, k, v, fm, chunk_size=4), (q, k, v), eps=1e-6, atol=1e-8
    )
    fm = _map("positive", d=4, m=6)
    _, st = favor.attention(q, k, v, fm, causal=True, return_state=True)
    kv0, z0 = st.kv.detach().requires_grad_(), st.z.detach().requires_grad_()

    def f(q, k, v, kv0, z0):
        out, s = favor.attention(
            q, k, v, fm, causal=True, chunk_size=4, initial_state=favor.State(kv0, z0, st.log_scale), return_state=True
        )
        # the state is kv * exp(log_scale); log_scale is a running max (no gradient), so the
        # differentiable quantity is the true sum, not kv alone (its gauge moves with the max)
        scale = s.log_scale.exp()
        return out, s.kv * scale[..., None, None], s.z * scale[..., None]

    assert torch.autograd.gradcheck(f, (q, k, v, kv0, z0), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("chunk", [3, 8])
def test_state_continuation_matches_one_pass_and_reference(gen, chunk):
    fm = _map("positive")
    q, k, v = _qkv(gen, shape=(2, 3, 29, 8))
    whole, st = favor.attention(q, k, v, fm, causal=True, chunk_size=chunk, return_state=True)
    a, s1 = favor.attention(
        q[..., :11, :], k[..., :11, :], v[..., :11, :], fm, causal=True, chunk_size=chunk, return_state=True
    )
    b, s2 = favor.attention(
        q[..., 11:, :],
        k[..., 11:, :],
        v[..., 11:, :],
        fm,
        causal=True,
        chunk_size=chunk,
        initial_state=s1,
        return_state=True,
    )
    _close(torch.cat([a, b], -2), whole, 1e-10)
    root = 8**-0.25
    fq, fk = fm.pair(q * root, k * root, causal=True)
    ref_out, ref_st = causal_chunked(fq, fk, v, chunk_size=chunk)
    _close(whole, ref_out, 1e-10)
    # the state's kv and z hold values up to 2^HEADROOM (their log scale takes it back):
    # round-off relative to the largest entry
    for got, want in zip(st, s2, strict=True):
        _close(got, want, 1e-10, relative=True)
    # states agree as true sums: kv * exp(log_scale)
    _close(st.kv * st.log_scale.exp()[..., None, None], ref_st.kv * ref_st.log_scale.exp()[..., None, None], 1e-10)
    # gradients through a continued sequence equal those of one pass
    g = torch.randn(whole.shape, generator=gen, dtype=whole.dtype)
    g1 = torch.autograd.grad(whole, (q, k, v), g)
    g2 = torch.autograd.grad(torch.cat([a, b], -2), (q, k, v), g)
    for x, y in zip(g1, g2, strict=True):
        _close(x, y, 1e-10)


@pytest.mark.parametrize("blocks", [2, 16])
@pytest.mark.parametrize("chunk", [4, 16])
@pytest.mark.parametrize("kernel", ["positive", "trig"])
def test_causal_fast_bitwise_independent_of_future(gen, monkeypatch, chunk, kernel, blocks):
    monkeypatch.setattr(causal_fast_module, "BLOCK_CHUNKS", blocks)
    fm = _map(kernel, dtype=torch.float32)
    q, k, v = (t.detach() for t in _qkv(gen, shape=(1, 2, 40, 8), dtype=torch.float32))
    t = 13  # inside a chunk for both chunk sizes
    out = favor.attention(q, k, v, fm, causal=True, chunk_size=chunk)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    k2[..., t + 1 :, :] *= 8.0  # much larger later keys: their log scales exceed every earlier one
    q2[..., t + 1 :, :] += 1.0
    v2[..., t + 1 :, :] = -v2[..., t + 1 :, :]
    out2 = favor.attention(q2, k2, v2, fm, causal=True, chunk_size=chunk)
    assert torch.equal(out[..., : t + 1, :], out2[..., : t + 1, :])
    assert not torch.equal(out[..., t + 1 :, :], out2[..., t + 1 :, :])


@pytest.mark.parametrize("blocks", [1, 2, 3])
@pytest.mark.parametrize("chunk", [1, 4, 5])
@pytest.mark.parametrize("kernel", ["positive", "oprf", "relu"])
def test_causal_fast_blocks_equal_reference(gen, monkeypatch, kernel, chunk, blocks):
    """Several blocks of chunks, a padded last block, key padding, a continued state and a
    gradient flowing in through the returned state: equal to the simple chunked path."""
    monkeypatch.setattr(causal_fast_module, "BLOCK_CHUNKS", blocks)
    fm = _map(kernel)
    q, k, v = _qkv(gen, shape=(2, 3, 29, 8))
    mask = _mask(2, 29)
    cut = 11

    def two_pieces():
        a, s1 = favor.attention(
            q[..., :cut, :], k[..., :cut, :], v[..., :cut, :], fm, causal=True, chunk_size=chunk, return_state=True
        )
        b, s2 = favor.attention(
            q[..., cut:, :],
            k[..., cut:, :],
            v[..., cut:, :],
            fm,
            causal=True,
            key_padding_mask=mask[:, cut:],
            chunk_size=chunk,
            initial_state=s1,
            return_state=True,
        )
        return torch.cat([a, b], -2), s2

    got, s2 = two_pieces()
    fast = api._fast_eligible
    monkeypatch.setattr(api, "_fast_eligible", lambda *x: False)
    want, r2 = two_pieces()  # the simple chunked path
    monkeypatch.setattr(api, "_fast_eligible", fast)
    _close(got, want, 1e-10)
    _close(s2.kv * s2.log_scale.exp()[..., None, None], r2.kv * r2.log_scale.exp()[..., None, None], 1e-10)
    g = torch.randn(got.shape, generator=gen, dtype=got.dtype)
    gkv = torch.randn(s2.kv.shape, generator=gen, dtype=got.dtype)

    def loss(out, st):
        # the state enters as a true sum kv * exp(log_scale), the same whichever max was used
        return (out * g).sum() + (st.kv * st.log_scale.exp()[..., None, None] * gkv).sum()

    for x, y in zip(
        torch.autograd.grad(loss(got, s2), (q, k, v)), torch.autograd.grad(loss(want, r2), (q, k, v)), strict=True
    ):
        _close(x, y, 1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_half_inputs_compute_in_float32(gen, dtype, causal):
    fm = _map("positive", dtype=torch.float32)
    q, k, v = (t.detach() for t in _qkv(gen, shape=(2, 2, 33, 8), dtype=dtype, std=3.0))
    out = favor.attention(q, k, v, fm, causal=causal, chunk_size=8)
    want = favor.kernel_attention(q.float(), k.float(), v.float(), fm, causal=causal)
    assert out.dtype == dtype and torch.isfinite(out).all()
    # the only error is the final cast to half precision
    tol = {torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype] * want.abs().max().item()
    _close(out.float(), want, tol)


def test_large_logits_no_overflow(gen):
    """q.k.scale up to about +-60: features stay finite in float32 (log scales carry the size)."""
    fm = _map("positive", d=16, m=32, dtype=torch.float32)
    q, k, v = (t.detach() for t in _qkv(gen, shape=(1, 2, 50, 16), dtype=torch.float32, std=4.0))
    for causal in (False, True):
        out = favor.attention(q, k, v, fm, causal=causal, chunk_size=16)
        want = favor.kernel_attention(q.double(), k.double(), v.double(), fm.double(), causal=causal)
        assert torch.isfinite(out).all()
        _close(out.double(), want, 1e-4 * max(1.0, want.abs().max().item()))


@pytest.mark.parametrize("causal", [False, True])
def test_official_stabilizer_still_works(gen, causal):
    """stabilizer='official' keys need a whole-sequence max: not row-wise, so the simple paths run."""
    fm = _map("positive", stabilizer="official")
    q, k, v = _qkv(gen)
    out = favor.attention(q, k, v, fm, causal=causal, chunk_size=5)
    _close(out, favor.kernel_attention(q, k, v, fm, causal=causal), 1e-10)
    assert not api._fast_eligible(fm, q, k, v)


def test_fully_padded_row_returns_zero(gen):
    fm = _map("positive")
    q, k, v = _qkv(gen, shape=(2, 1, 9, 8))
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[1] = True
    for causal in (False, True):
        out = favor.attention(q, k, v, fm, causal=causal, key_padding_mask=mask, chunk_size=4)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        g = torch.autograd.grad(out.sum(), (q, k, v))
        assert all(torch.isfinite(x).all() for x in g)


@pytest.mark.parametrize("root", [1.0, 0.6])
@pytest.mark.parametrize("kernel", ["positive", "oprf", "trig"])
def test_row_features_equal_maps(gen, kernel, root):
    """The base-2, scale-folded fast features are phi(x * root) of the reference maps."""
    fm = _map(kernel, d=8, m=16)
    x = torch.randn(2, 3, 11, 8, generator=gen, dtype=torch.float64)
    a = fm.oprf_a(x * root, x * root) if kernel == "oprf" else None
    want = fm.exact_features(x * root, a).explicit()
    got = row_features(fm, root)(x, a).explicit()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_oprf_row_features_follow_a_new_or_modified_a(gen):
    """oprf's per-call constants are cached for the A last seen: a different A, or the same
    tensor modified in place, must give that A's features, not the cached ones."""
    fm = _map("oprf", d=8, m=16)
    x = torch.randn(2, 3, 11, 8, generator=gen, dtype=torch.float64)
    feat = row_features(fm)
    a = torch.full((2, 3), -0.1, dtype=torch.float64)
    with torch.no_grad():
        for value in (-0.1, -0.3):
            a.fill_(value)  # in place: same tensor, new version
            torch.testing.assert_close(feat(x, a).explicit(), fm.exact_features(x, a).explicit(), rtol=1e-12, atol=0)
        b = torch.full((2, 3), -0.05, dtype=torch.float64)
        torch.testing.assert_close(feat(x, b).explicit(), fm.exact_features(x, b).explicit(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("kernel", ["positive", "oprf"])
def test_row_features_vjp_equals_autograd(gen, kernel):
    """The hand-written feature gradients (no graph; A constant) equal autograd's through
    values and log scale."""
    fm = _map(kernel, d=8, m=16)
    feat = row_features(fm, 0.6)
    x = torch.randn(2, 3, 11, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    a = fm.oprf_a(x.detach() * 0.6, x.detach() * 0.6) if kernel == "oprf" else None
    f = feat(x, a)
    dvals = torch.randn(f.values.shape, generator=gen, dtype=torch.float64)
    dls = torch.randn(f.log_scale.shape, generator=gen, dtype=torch.float64)
    want = torch.autograd.grad([f.values, f.log_scale], x, [dvals, dls])[0]
    with torch.no_grad():
        got = feat.vjp(x.detach(), a, feat(x.detach(), a).values, dvals.clone(), dls)
    # values reach 2^HEADROOM, and so do these gradients: float64 round-off of the largest
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14 * float(want.abs().max()))


def test_oprf_row_features_vjp_a_equals_autograd(gen):
    """With FAVOR++'s A in the graph (data-adaptive), the hand-written (dx, dA) equal
    autograd's through values and log scale, for every head's own A."""
    fm = _map("oprf", d=8, m=16)
    feat = row_features(fm, 0.6)
    x = torch.randn(2, 3, 11, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    a = torch.linspace(-0.3, -0.02, 6, dtype=torch.float64).view(2, 3).requires_grad_(True)
    f = feat(x, a)
    dvals = torch.randn(f.values.shape, generator=gen, dtype=torch.float64)
    dls = torch.randn(f.log_scale.shape, generator=gen, dtype=torch.float64)
    want = torch.autograd.grad([f.values, f.log_scale], (x, a), [dvals, dls])
    with torch.no_grad():
        x0, a0 = x.detach(), a.detach()
        got = feat.vjp_a(x0, a0, feat(x0, a0).values, dvals.clone(), dls)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-13)


def test_bidirectional_fast_matches_simple_path_directly(gen):
    fm = _map("hyperbolic")
    q, k, v = _qkv(gen, shape=(2, 3, 19, 8))
    kk = k[..., :13, :]
    vv = v[..., :13, :]
    fq, fk = fm.pair(q, kk)
    want = bidirectional(fq, fk, vv)
    got = bidirectional_fast(q, kk, vv, fm.exact_features, chunk_size=4)  # Lq != Lk
    _close(got, want, 1e-10)


def test_saved_for_backward_is_linear_and_small():
    """No L x M' feature tensor (nor L x M' x Dv) is kept for backward: what autograd holds
    is q, k, v, the output and O(L/C) states."""
    length, d, m, chunk = 1024, 16, 256, 128
    fm = favor.FeatureMap("positive", dim=d, num_features=m, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, length, d, generator=gen).requires_grad_() for _ in range(3))
    for causal in (False, True):
        saved: list[int] = []

        def pack(t, saved=saved):
            saved.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = favor.attention(q, k, v, fm, causal=causal, chunk_size=chunk)
        features = 2 * length * m
        assert sum(saved) < features // 2, (causal, sum(saved), features)
        states = (length // chunk) * 2 * m * (d + 1)  # (L/C) x H x M' x (Dv + 1), the causal chunk states
        assert max(saved) <= max(2 * length * d, states)
        out.sum().backward()
        assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
        q.grad = k.grad = v.grad = None


def test_chunk_size_validation(gen):
    fm = _map("positive")
    q, k, v = _qkv(gen)
    with pytest.raises(ValueError, match="chunk_size"):
        favor.attention(q, k, v, fm, causal=True, chunk_size=0)
    assert math.isfinite(favor.attention(q, k, v, fm, chunk_size=100).sum().item())


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel", ["positive", "oprf", "relu"])
@pytest.mark.parametrize("wanted", ["q", "k", "v", "qk", "kv", "qv"])
def test_gradients_of_a_subset_of_inputs(gen, kernel, causal, wanted):
    """The backwards compute only the gradients asked for: each subset of (q, k, v), with and
    without padding, equals the explicit reference's (float64, 1e-10)."""
    fm = _map(kernel, d=8, m=16)
    base = _qkv(gen, shape=(2, 3, 37, 8))
    mask = torch.zeros(2, 37, dtype=torch.bool)
    mask[1, -5:] = True
    for m in (None, mask):
        outs = []
        for f in (favor.attention, favor.kernel_attention):
            ts = [b.detach().clone().requires_grad_(n in wanted) for b, n in zip(base, "qkv", strict=True)]
            extra = {"chunk_size": 8} if f is favor.attention else {}
            out = f(*ts, fm, causal=causal, key_padding_mask=m, **extra)
            g_out = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
            outs.append(torch.autograd.grad(out, [t for t in ts if t.requires_grad], g_out))
        for got, want in zip(*outs, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_default_bidirectional_chunk_adapts_to_batch_times_heads(gen):
    from favor.ops.bidirectional_fast import default_chunk

    # 8192 rows over all (batch, head) pairs, within [512, 4096]
    assert [default_chunk(n) for n in (1, 2, 4, 8, 16, 64)] == [4096, 4096, 2048, 1024, 512, 512]
    # the default takes several chunks at 2 heads and L = 9000 and gives the one-chunk sums
    fm = favor.FeatureMap("positive", dim=4, num_features=8, generator=torch.Generator().manual_seed(0))
    q, k, v = (torch.randn(1, 2, 9000, 4, generator=gen, dtype=torch.float64) * 0.5 for _ in range(3))
    torch.testing.assert_close(
        favor.attention(q, k, v, fm), favor.attention(q, k, v, fm, chunk_size=9000), rtol=1e-12, atol=1e-14
    )
