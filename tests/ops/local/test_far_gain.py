"""The far gain (``far_log_gain`` g of favor.attention / favor.step, FavorAttention's
``far_gain``): gain 0 is bit-identical to no gain on every path; gain g equals the quadratic
float64 reference with the far terms scaled by exp(g) (``exact_terms_reference`` with
log_const = -g: one normaliser, so only the ratio of the parts matters), outputs and
gradients, the gain's own included; the bidirectional, causal chunked and recurrent-step
paths agree with it; bad gains are refused by name. Tolerances: float64 round-off (1e-10)."""

from __future__ import annotations

import pytest
import torch

import favor
from favor.ops.local.reference import exact_terms_reference
from favor.ops.local.spec import exact_mask
from favor.ops.local.window import explicit_reference

B, H, L, D = 2, 3, 29, 8
TERMS = [favor.ExactTerms(4, 2, 1), favor.ExactTerms(3, 1, 4), favor.ExactTerms(0, 0, 1)]


def _map(m=16):
    return favor.FeatureMap("positive", dim=D, num_features=m, generator=torch.Generator().manual_seed(1)).double()


def _qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, D, dtype=torch.float64, generator=g).requires_grad_() for _ in range(3)]


def _gain():
    return torch.tensor([-1.5, 0.0, 0.7], dtype=torch.float64, requires_grad=True)


def _pad():
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[0, 24:] = True
    pad[1, :3] = True
    return pad


def _close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def _scaled_far_reference(q, k, v, fm, terms, gain, *, causal, pad=None):
    """The definition, written independently of log_const: the explicit (L, L) weights,
    exact softmax on the exact set, the features' kernel x exp(g) elsewhere."""
    root = D**-0.25
    fq, fk = fm.pair(q * root, k * root, causal=causal)
    kernel = (fq.values @ fk.values.mT) * torch.exp(fq.log_scale[..., :, None] + fk.log_scale[..., None, :])
    kernel = kernel * torch.exp(gain)[:, None, None]
    near = exact_mask(L, terms, causal=causal)
    return explicit_reference(near, kernel, (q * root) @ (k * root).mT, v, 0.0, pad, causal=causal)


@pytest.mark.parametrize("terms", TERMS, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("trained", [False, True], ids=["fast", "autograd"])
def test_gain_equals_the_far_terms_scaled_by_exp_g(terms, causal, padded, trained):
    fm = _map()
    if trained:  # a trained projection routes to the autograd paths
        fm.projection.requires_grad_(True)
    q, k, v = _qkv()
    gain = _gain()
    pad = _pad() if padded else None
    ref = _scaled_far_reference(q, k, v, fm, terms, gain, causal=causal, pad=pad)
    # the definition is the ops' reference with log_const = -g
    _close(
        ref,
        exact_terms_reference(q, k, v, fm, terms, causal=causal, key_padding_mask=pad, log_const=-gain[:, None, None]),
    )
    out = favor.attention(
        q, k, v, fm, causal=causal, exact=terms, key_padding_mask=pad, far_log_gain=gain, chunk_size=8
    )
    keep = torch.ones(B, 1, L, 1, dtype=torch.float64) if pad is None else (~pad)[:, None, :, None].double()
    _close(out * keep, ref * keep)
    w = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * keep
    leaves = (q, k, v, gain)
    g_ref = torch.autograd.grad((ref * w).sum(), leaves)
    g_out = torch.autograd.grad((out * w).sum(), leaves)
    for name, a, b in zip("q k v gain".split(), g_out, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")
    assert g_out[-1].abs().min() > 0  # every head's gain is trained, not silently zero


@pytest.mark.parametrize("causal", [False, True])
def test_gain_gradcheck(causal):
    fm = _map(m=6)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 11, D, dtype=torch.float64, generator=g) for _ in range(3))
    gain = torch.tensor([0.4, -0.9], dtype=torch.float64, requires_grad=True)
    terms = favor.ExactTerms(2, 1, 1)

    def f(gain, v):
        return favor.attention(q, k, v, fm, causal=causal, exact=terms, far_log_gain=gain, chunk_size=4)

    assert torch.autograd.gradcheck(f, (gain, v.requires_grad_()), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("terms", TERMS, ids=str)
def test_recurrent_step_and_continued_pass_use_the_gain(terms):
    fm = _map()
    q, k, v = (t.detach() for t in _qkv(4))
    gain = _gain().detach()
    full = favor.attention(q, k, v, fm, causal=True, exact=terms, far_log_gain=gain)
    _close(full, _scaled_far_reference(q, k, v, fm, terms, gain, causal=True))
    state, outs = None, []
    for t in range(L):
        o, state = favor.step(state, q[..., t, :], k[..., t, :], v[..., t, :], fm, exact=terms, far_log_gain=gain)
        outs.append(o)
    _close(torch.stack(outs, -2), full)
    # a chunked prefill continued by a few queries (the step loop) and then a long piece
    st, pieces = None, []
    for lo, hi in ((0, 10), (10, 12), (12, L)):
        piece = (t[..., lo:hi, :] for t in (q, k, v))
        o, st = favor.attention(
            *piece, fm, causal=True, exact=terms, far_log_gain=gain, initial_state=st, return_state=True
        )
        pieces.append(o)
    _close(torch.cat(pieces, -2), full)


@pytest.mark.parametrize("causal", [False, True])
def test_gain_zero_is_bit_identical_to_no_gain(causal):
    fm = _map()
    terms = favor.ExactTerms(4, 2, 1)
    pad = _pad()
    q, k, v = _qkv(5)
    plain = favor.attention(q, k, v, fm, causal=causal, exact=terms, key_padding_mask=pad)
    g_plain = torch.autograd.grad(plain.sum(), (q, k, v))
    zero = torch.zeros(H, dtype=torch.float64, requires_grad=True)
    for gain in (zero, 0.0):
        got = favor.attention(q, k, v, fm, causal=causal, exact=terms, key_padding_mask=pad, far_log_gain=gain)
        assert torch.equal(got, plain)
        for a, b in zip(torch.autograd.grad(got.sum(), (q, k, v)), g_plain, strict=True):
            assert torch.equal(a, b)
    if causal:
        q, k, v = (t.detach() for t in (q, k, v))
        s0 = s1 = None
        for t in range(L):
            o0, s0 = favor.step(s0, q[..., t, :], k[..., t, :], v[..., t, :], fm, exact=terms)
            o1, s1 = favor.step(
                s1, q[..., t, :], k[..., t, :], v[..., t, :], fm, exact=terms, far_log_gain=zero.detach()
            )
            assert torch.equal(o0, o1)


def test_a_three_dim_input_takes_a_per_batch_gain():
    fm = _map()
    q, k, v = (t.detach()[:, 0] for t in _qkv(6))  # (B, L, D): no head axis
    terms = favor.ExactTerms(3, 1, 1)
    gain = torch.tensor([0.5, -0.5], dtype=torch.float64)
    for causal in (False, True):
        got = favor.attention(q, k, v, fm, causal=causal, exact=terms, far_log_gain=gain)
        for b in range(B):
            one = favor.attention(q[b], k[b], v[b], fm, causal=causal, exact=terms, far_log_gain=float(gain[b]))
            _close(got[b], one)


def test_bad_gains_are_refused_by_name():
    fm = _map()
    q, k, v = (t.detach() for t in _qkv())
    terms = favor.ExactTerms(2)
    with pytest.raises(ValueError, match="far_log_gain .* needs exact"):
        favor.attention(q, k, v, fm, far_log_gain=0.5)
    with pytest.raises(ValueError, match="far_log_gain .* needs exact"):
        favor.step(None, q[..., 0, :], k[..., 0, :], v[..., 0, :], fm, far_log_gain=0.5)
    for bad in (float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="far_log_gain must be a finite float"):
            favor.attention(q, k, v, fm, exact=terms, far_log_gain=bad)
    with pytest.raises(ValueError, match=r"far_log_gain of shape \(4,\) must broadcast"):
        favor.attention(q, k, v, fm, exact=terms, far_log_gain=torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="must broadcast"):  # would add an axis to the output
        favor.attention(q, k, v, fm, exact=terms, far_log_gain=torch.zeros(5, B, H, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating-point"):
        favor.attention(q, k, v, fm, exact=terms, far_log_gain=torch.zeros(H, dtype=torch.long))
