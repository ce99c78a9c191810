"""FavorAttention against nn.MultiheadAttention (shapes, masks, exact-softmax numerics) and
against the functional core (favor.attention / favor.step)."""

import pytest
import torch
from torch import nn

import favor
from favor.nn import AttentionState, FavorAttention

E, H = 16, 4


def _mha(kdim=None, vdim=None, batch_first=True):
    torch.manual_seed(0)
    return nn.MultiheadAttention(E, H, kdim=kdim, vdim=vdim, batch_first=batch_first, dtype=torch.float64)


@pytest.mark.parametrize("batch_first", [True, False])
def test_shapes_match_mha_self_and_cross(batch_first):
    g = torch.Generator().manual_seed(1)
    mha = _mha(kdim=12, vdim=10, batch_first=batch_first)
    fa = FavorAttention(E, H, kdim=12, vdim=10, batch_first=batch_first).double()
    q = torch.randn(2, 7, E, generator=g, dtype=torch.float64)
    k = torch.randn(2, 5, 12, generator=g, dtype=torch.float64)
    v = torch.randn(2, 5, 10, generator=g, dtype=torch.float64)
    if not batch_first:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    want, _ = mha(q, k, v, need_weights=False)
    got, weights = fa(q, k, v)
    assert got.shape == want.shape and weights is None
    x = q if batch_first else q
    self_out, _ = FavorAttention(E, H, batch_first=batch_first).double()(x)
    assert self_out.shape == x.shape


def test_default_num_features_is_d_ln_d():
    fa = FavorAttention(64, 4)
    assert fa.feature_map.num_features == favor.default_num_features(16) == round(16 * __import__("math").log(16))


@pytest.mark.parametrize("causal", [False, True])
def test_softmax_switch_equals_mha_with_copied_weights(causal):
    # same parameters and exact softmax: must agree with PyTorch's MHA to float64 round-off
    g = torch.Generator().manual_seed(2)
    mha = _mha()
    fa = FavorAttention.from_multihead_attention(mha, attention="softmax", causal=causal)
    x = torch.randn(3, 9, E, generator=g, dtype=torch.float64)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[1, 6:] = True
    mask[2, 3:] = True
    attn_mask = torch.ones(9, 9, dtype=torch.bool).triu(1) if causal else None
    want, _ = mha(x, x, x, key_padding_mask=None if causal else mask, attn_mask=attn_mask, need_weights=False)
    got, _ = fa(x, key_padding_mask=None if causal else mask)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_softmax_switch_equals_mha_cross_attention_kdim_vdim():
    g = torch.Generator().manual_seed(3)
    mha = _mha(kdim=6, vdim=5)
    fa = FavorAttention.from_multihead_attention(mha, attention="softmax")
    q = torch.randn(2, 4, E, generator=g, dtype=torch.float64)
    k = torch.randn(2, 8, 6, generator=g, dtype=torch.float64)
    v = torch.randn(2, 8, 5, generator=g, dtype=torch.float64)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, 5:] = True
    want, _ = mha(q, k, v, key_padding_mask=mask, need_weights=False)
    got, _ = fa(q, k, v, key_padding_mask=mask)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def _manual(fa, q_in, k_in, v_in, **kw):
    b, lq, _ = q_in.shape
    heads = lambda t: t.view(b, t.shape[1], H, E // H).transpose(1, 2)  # noqa: E731
    q, k, v = heads(fa.q_proj(q_in)), heads(fa.k_proj(k_in)), heads(fa.v_proj(v_in))
    out = favor.attention(q, k, v, fa.feature_map, **kw)
    return fa.out_proj(out.transpose(1, 2).reshape(b, lq, E))


@pytest.mark.parametrize("kernel", ["positive", "trig", "relu", "oprf"])
def test_favor_mode_is_projections_around_core_attention(kernel):
    g = torch.Generator().manual_seed(4)
    fa = FavorAttention(E, H, kernel=kernel, generator=torch.Generator().manual_seed(0)).double()
    q = torch.randn(2, 6, E, generator=g, dtype=torch.float64)
    kv = torch.randn(2, 9, E, generator=g, dtype=torch.float64)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[1, 4:] = True
    got, _ = fa(q, kv, key_padding_mask=mask)
    torch.testing.assert_close(got, _manual(fa, q, kv, kv, key_padding_mask=mask), rtol=1e-12, atol=1e-12)


def test_key_padding_mask_padded_batch_equals_unpadded():
    # True = padding, as in nn.MultiheadAttention: padded keys must not count anywhere
    g = torch.Generator().manual_seed(5)
    fa = FavorAttention(E, H).double()
    x = torch.randn(1, 5, E, generator=g, dtype=torch.float64)
    padded = torch.cat([x, torch.randn(1, 3, E, generator=g, dtype=torch.float64) * 50], dim=1)
    mask = torch.tensor([[False] * 5 + [True] * 3])
    ref, _ = fa(x)
    got, _ = fa(padded, key_padding_mask=mask)
    torch.testing.assert_close(got[:, :5], ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("attention", ["favor", "softmax"])
@pytest.mark.parametrize("rotary", [False, True])
def test_recurrent_state_equals_full_forward(attention, rotary):
    g = torch.Generator().manual_seed(6)
    fa = FavorAttention(E, H, causal=True, attention=attention, rotary=rotary).double()
    x = torch.randn(2, 11, E, generator=g, dtype=torch.float64)
    full, _ = fa(x)
    # a prefix in one call, then token by token, then a multi-token piece
    out1, st = fa(x[:, :4], return_state=True)
    outs = [out1]
    for t in range(4, 8):
        o, st = fa(x[:, t : t + 1], state=st)
        outs.append(o)
    o, st = fa(x[:, 8:], state=st)
    outs.append(o)
    assert isinstance(st, AttentionState) and st.position == 11
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-12)


def test_favor_state_size_is_constant():
    fa = FavorAttention(E, H, causal=True).double()
    x = torch.randn(1, 50, E, dtype=torch.float64)
    _, s1 = fa(x[:, :5], return_state=True)
    _, s2 = fa(x, return_state=True)
    assert [t.shape for t in s1.favor] == [t.shape for t in s2.favor]


def test_state_dict_round_trip_exact():
    fa = FavorAttention(E, H, generator=torch.Generator().manual_seed(7))
    assert "feature_map.projection" in fa.state_dict()
    other = FavorAttention(E, H, generator=torch.Generator().manual_seed(8))
    x = torch.randn(2, 6, E)
    assert not torch.equal(fa(x)[0], other(x)[0])
    other.load_state_dict(fa.state_dict())
    assert torch.equal(fa(x)[0], other(x)[0])


def test_gradients_flow_to_all_parameters():
    fa = FavorAttention(E, H, causal=True, rotary=True)
    fa(torch.randn(2, 6, E))[0].square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fa.parameters())


def test_rotary_scores_depend_on_relative_position_only():
    from favor.nn import apply_rotary

    g = torch.Generator().manual_seed(9)
    q, k = torch.randn(1, 8, generator=g, dtype=torch.float64), torch.randn(1, 8, generator=g, dtype=torch.float64)
    s1 = (apply_rotary(q, 3) * apply_rotary(k, 1)).sum()
    s2 = (apply_rotary(q, 12) * apply_rotary(k, 10)).sum()
    torch.testing.assert_close(s1, s2, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(s1, (q * k).sum())


def test_bad_inputs_raise_naming_the_argument():
    with pytest.raises(ValueError, match="embed_dim must be divisible"):
        FavorAttention(10, 3)
    with pytest.raises(ValueError, match="attention must be one of"):
        FavorAttention(E, H, attention="linear")
    fa = FavorAttention(E, H)
    with pytest.raises(ValueError, match="need_weights"):
        fa(torch.randn(1, 3, E), need_weights=True)
    with pytest.raises(ValueError, match="embed_dim=16"):
        fa(torch.randn(1, 3, 8))
    with pytest.raises(ValueError, match="causal self-attention"):
        fa(torch.randn(1, 3, E), return_state=True)
    with pytest.raises(ValueError, match="query must be a 3-d"):
        fa(torch.randn(3, E))


@pytest.mark.parametrize("attention", ["favor", "softmax"])
def test_fully_padded_row_gives_bias_only_not_nan(attention):
    # nn.MultiheadAttention returns NaN here; favor's contract is 0 before out_proj
    fa = FavorAttention(E, H, attention=attention).double()
    x = torch.randn(2, 4, E, dtype=torch.float64)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[1] = True
    out, _ = fa(x, key_padding_mask=mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1], fa.out_proj.bias.expand(4, E), rtol=0, atol=1e-12)
