"""favor.ExactTerms through favor.attention and favor.step: the causal fast path (hand-written
group-wise backward), its autograd twin, the step loop with its ring buffer, a chunked pass
continued from a state, and the bidirectional paths all equal the quadratic float64
reference (``exact_terms_reference``) to round-off, outputs and gradients. Tolerances are
float64 round-off (1e-10) unless stated."""

from __future__ import annotations

import pytest
import torch

import favor
from favor.ops.local import causal_fast as causal_fast_module
from favor.ops.local.causal_fast import causal_exact_autograd, causal_exact_fast
from favor.ops.local.dispatch import exact_attention
from favor.ops.local.reference import exact_terms_reference
from favor.ops.local.spec import exact_mask
from favor.ops.row_features import row_features

B, H, L, D = 2, 3, 37, 8
TERMS = [
    favor.ExactTerms(4, 2, 1),
    favor.ExactTerms(0, 0, 1),  # the query alone
    favor.ExactTerms(3, 1, 4),  # blocks, ragged last block (37 = 9 * 4 + 1)
    favor.ExactTerms(64, 4, 1),  # W >= L: softmax
    favor.ExactTerms(2, 9, 3),  # sinks past the window
    favor.ExactTerms(12, 2, 1),  # W a multiple of chunks 4 and 6: far keys in the span's first chunk only
    favor.ExactTerms(8, 1, 4),  # blocks, W = chunk 8: likewise
]


def _map(kernel="positive", m=16):
    return favor.FeatureMap(kernel, dim=D, num_features=m, generator=torch.Generator().manual_seed(1)).double()


def _qkv(seed=0, length=L):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, length, D, dtype=torch.float64, generator=g) for _ in range(3)]


def _pad():
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[0, 30:] = True  # right padding
    pad[1, :5] = True  # left padding
    return pad


def _close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_spec_validates_and_describes_the_exact_set():
    with pytest.raises(ValueError, match="ExactTerms.window must be an int >= 0"):
        favor.ExactTerms(-1)
    with pytest.raises(ValueError, match="ExactTerms.block must be an int >= 1"):
        favor.ExactTerms(4, 0, 0)
    with pytest.raises(ValueError, match="sinks"):
        favor.ExactTerms(4, True)
    near = exact_mask(8, favor.ExactTerms(1, 1, 2), causal=True)
    # query 5: block 4..5 widened by 1 -> 3..5, plus sink 0
    assert near[5].nonzero().flatten().tolist() == [0, 3, 4, 5]
    near = exact_mask(8, favor.ExactTerms(1, 0, 2), causal=False)
    assert near[5].nonzero().flatten().tolist() == [3, 4, 5, 6]


@pytest.mark.parametrize("terms", TERMS, ids=str)
@pytest.mark.parametrize("padded", [False, True])
def test_causal_fast_and_autograd_paths_equal_the_reference(terms, padded):
    fm = _map()
    q, k, v = (t.requires_grad_() for t in _qkv())
    pad = _pad() if padded else None
    ref = exact_terms_reference(q, k, v, fm, terms, causal=True, key_padding_mask=pad)
    w = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    if pad is not None:  # padded queries: only real rows are compared
        w = w * (~pad)[:, None, :, None]
    g_ref = torch.autograd.grad((ref * w).sum(), (q, k, v))
    root = D**-0.25
    feat = row_features(fm, root)
    mask = None if pad is None else pad[:, None, :]
    for run in (causal_exact_fast, causal_exact_autograd):
        for chunk in (6, 8, 64):
            out = run(q, k, v, feat, terms, root=root, key_padding_mask=mask, chunk_size=chunk)
            _close(out * (w != 0), ref * (w != 0))
            for a, b in zip(torch.autograd.grad((out * w).sum(), (q, k, v)), g_ref, strict=True):
                _close(a, b)


@pytest.mark.parametrize("kernel", ["positive", "oprf", "relu"])
@pytest.mark.parametrize("terms", TERMS[:3], ids=str)
def test_attention_step_and_continued_passes_equal_the_reference(kernel, terms):
    fm = _map(kernel)
    q, k, v = _qkv(1)
    ref = exact_terms_reference(q, k, v, fm, terms, causal=True)
    _close(favor.attention(q, k, v, fm, causal=True, exact=terms), ref)
    state, outs = None, []
    for t in range(L):
        o, state = favor.step(state, q[..., t, :], k[..., t, :], v[..., t, :], fm, exact=terms)
        outs.append(o)
    _close(torch.stack(outs, -2), ref)
    o1, s1 = favor.attention(
        q[..., :20, :], k[..., :20, :], v[..., :20, :], fm, causal=True, exact=terms, return_state=True
    )
    o2 = favor.attention(q[..., 20:, :], k[..., 20:, :], v[..., 20:, :], fm, causal=True, exact=terms, initial_state=s1)
    _close(torch.cat([o1, o2], -2), ref)
    # bidirectional: local_fast (FAVOR+, FAVOR++) or the autograd block path (ReLU)
    _close(favor.attention(q, k, v, fm, exact=terms), exact_terms_reference(q, k, v, fm, terms, causal=False))


def test_the_step_state_does_not_grow_with_context():
    fm = _map()
    terms = favor.ExactTerms(4, 2, 3)
    q, k, v = _qkv(2, length=200)
    state, sizes = None, []
    for t in range(200):
        _, state = favor.step(state, q[..., t, :], k[..., t, :], v[..., t, :], fm, exact=terms)
        sizes.append(sum(x.numel() * x.element_size() for x in (*state.far, *state[1:])))
    assert len(set(sizes)) == 1
    assert state.keys_x.shape[-2] == terms.window + terms.block + terms.sinks


@pytest.mark.parametrize("terms", [favor.ExactTerms(4, 2, 1), favor.ExactTerms(3, 1, 4)], ids=str)
def test_in_place_steps_equal_copying_steps_and_reuse_the_state(terms):
    """A cache that owns its state (favor.hf's FavorCache) steps in place: the same numbers
    as the copying step, with the far state's and the slots' storage kept."""
    fm = _map("oprf")
    q, k, v = _qkv(5)
    root = D**-0.25
    pad = _pad()
    prompt = dict(causal=True, root=root, return_state=True)
    _, s0 = exact_attention(
        q[..., :9, :], k[..., :9, :], v[..., :9, :], fm, terms, key_padding_mask=pad[:, :9], **prompt
    )
    _, s1 = exact_attention(
        q[..., :9, :], k[..., :9, :], v[..., :9, :], fm, terms, key_padding_mask=pad[:, :9], **prompt
    )
    ptrs = [x.data_ptr() for x in (*s1.far, *s1[1:5])]
    for t in range(9, L):
        step = dict(causal=True, root=root, return_state=True, key_padding_mask=pad[:, t : t + 1])
        qkv = [x[..., t : t + 1, :] for x in (q, k, v)]
        o0, s0 = exact_attention(*qkv, fm, terms, initial_state=s0, **step)
        o1, s1 = exact_attention(*qkv, fm, terms, initial_state=s1, inplace=True, **step)
        torch.testing.assert_close(o1, o0, rtol=0, atol=0)
    for a, b in zip((*s0.far, *s0[1:]), (*s1.far, *s1[1:]), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [x.data_ptr() for x in (*s1.far, *s1[1:5])] == ptrs


@pytest.mark.parametrize("terms", [favor.ExactTerms(4, 2, 1), favor.ExactTerms(3, 1, 4)], ids=str)
def test_causal_output_is_bit_for_bit_independent_of_later_tokens(terms):
    fm = _map().float()
    q, k, v = (t.float() for t in _qkv(3, length=150))
    out = favor.attention(q, k, v, fm, causal=True, exact=terms)
    for cut in (1, 64, 100):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for t in (q2, k2, v2):
            t[..., cut:, :] = torch.randn_like(t[..., cut:, :]) * 30
        out2 = favor.attention(q2, k2, v2, fm, causal=True, exact=terms)
        assert torch.equal(out[..., :cut, :], out2[..., :cut, :])


def test_left_padded_batch_equals_the_unpadded_sequence():
    # positions count from the start of the padded row, so sinks and blocks would land on
    # padding; with a window alone every real query sees the same keys as without padding
    fm = _map()
    terms = favor.ExactTerms(4)
    q, k, v = _qkv(4)
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[1, :6] = True  # left padding of the second sequence
    out = favor.attention(q, k, v, fm, causal=True, exact=terms, key_padding_mask=pad)
    alone = favor.attention(q[1:, :, 6:], k[1:, :, 6:], v[1:, :, 6:], fm, causal=True, exact=terms)
    _close(out[1:, :, 6:], alone)
    # and the unpadded first sequence is untouched by its neighbour's padding
    _close(out[:1], favor.attention(q[:1], k[:1], v[:1], fm, causal=True, exact=terms))


def test_float32_large_logits_stay_finite_and_close_to_float64():
    fm = _map().float()
    q, k, v = _qkv(5, length=130)
    q, k = q * 6, k * 6  # logits q.k / sqrt(D) up to ~ +-60
    terms = favor.ExactTerms(8, 1, 1)
    out32 = favor.attention(q.float(), k.float(), v.float(), fm, causal=True, exact=terms)
    out64 = favor.attention(q, k, v, fm.double(), causal=True, exact=terms)
    assert torch.isfinite(out32).all()
    # float32 round-off through exponents of size ~60: relative ~1e-5 measured
    torch.testing.assert_close(out32.double(), out64, rtol=1e-3, atol=1e-4)


def test_clear_errors():
    fm = _map()
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="nearby positions"):
        favor.attention(q, k[..., :10, :], v[..., :10, :], fm, exact=favor.ExactTerms(2))
    with pytest.raises(TypeError, match="ExactTerms"):
        favor.attention(q, k, v, fm, causal=True, exact="window")
    _, state = favor.attention(q, k, v, fm, causal=True, return_state=True)
    with pytest.raises(TypeError, match="ExactState"):
        favor.step(state, q[..., 0, :], k[..., 0, :], v[..., 0, :], fm, exact=favor.ExactTerms(2))
    with pytest.raises(ValueError, match="causal"):
        favor.attention(q, k, v, fm, exact=favor.ExactTerms(2), return_state=True)


@pytest.mark.parametrize("keep_bytes", [0, 2**40], ids=["recomputed", "kept"])
@pytest.mark.parametrize("terms", [favor.ExactTerms(4, 2, 1), favor.ExactTerms(3, 1, 4)], ids=str)
def test_fast_backward_from_kept_or_recomputed_parts_equals_the_reference(terms, keep_bytes, monkeypatch):
    # the forward keeps every group's parts for the backward when they fit KEEP_BYTES, else
    # the backward recomputes each group's forward: both give the reference's outputs and
    # gradients (several groups: chunk 4 x BLOCK_CHUNKS 2 = 8 rows per group on L = 37)
    monkeypatch.setattr(causal_fast_module, "KEEP_BYTES", keep_bytes)
    monkeypatch.setattr(causal_fast_module, "BLOCK_CHUNKS", 2)
    calls = []
    parts = causal_fast_module._Inputs.parts
    monkeypatch.setattr(
        causal_fast_module._Inputs, "parts", lambda self, *a, **kw: calls.append(1) or parts(self, *a, **kw)
    )
    fm = _map()
    q, k, v = (t.requires_grad_() for t in _qkv(8))
    pad = _pad()
    ref = exact_terms_reference(q, k, v, fm, terms, causal=True, key_padding_mask=pad)
    w = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    w = w * (~pad)[:, None, :, None]
    g_ref = torch.autograd.grad((ref * w).sum(), (q, k, v))
    out = causal_exact_fast(
        q, k, v, row_features(fm, D**-0.25), terms, root=D**-0.25, key_padding_mask=pad[:, None, :], chunk_size=4
    )
    _close(out * (w != 0), ref * (w != 0))
    groups = len(calls)
    assert groups == 5  # ceil(37 / 8)
    for a, b in zip(torch.autograd.grad((out * w).sum(), (q, k, v)), g_ref, strict=True):
        _close(a, b)
    assert len(calls) == (2 * groups if keep_bytes == 0 else groups)  # recomputed: one more forward


@pytest.mark.parametrize("kernel", ["positive", "relu"])
def test_fast_backward_equals_autograd_with_logit_inputs_and_a_per_head_log_const(kernel):
    # favor.hf's dense features estimate exp(qx.kx + log_const) from other inputs (q, k):
    # the hand-written backward reaches q, k, qx, kx, v and the per-head log_const; ReLU has
    # no hand-written feature gradient (autograd over its recomputed features)
    fm = _map(kernel)
    q, k, v = _qkv(6)
    g = torch.Generator().manual_seed(7)
    qx, kx = (torch.randn(B, H, L, 5, dtype=torch.float64, generator=g) for _ in range(2))
    lc = torch.randn(H, 1, 1, dtype=torch.float64, generator=g)
    leaves = [t.requires_grad_() for t in (q, k, v, qx, kx, lc)]
    pad = _pad()[:, None, :]
    terms = favor.ExactTerms(3, 2, 2)
    feat = row_features(fm, 0.7)
    w = torch.randn(B, H, L, D, dtype=torch.float64, generator=g)
    got = []
    for run in (causal_exact_fast, causal_exact_autograd):
        out = run(q, k, v, feat, terms, root=0.7, qx=qx, kx=kx, log_const=lc, key_padding_mask=pad, chunk_size=4)
        got.append((out, torch.autograd.grad((out * w).sum(), leaves)))
    _close(got[0][0], got[1][0])
    for name, a, b in zip(("q", "k", "v", "qx", "kx", "log_const"), got[0][1], got[1][1], strict=True):
        assert torch.isfinite(a).all(), name
        _close(a, b)
    assert got[0][1][-1].abs().sum() > 0  # the log_const gradient is not silently zero
