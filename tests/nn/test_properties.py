"""Property tests (hypothesis) of FavorAttention over random sizes (E, H, kdim, vdim, B,
Lq, Lk including 0 and 1), masks, kernels, rotary, batch_first and dtypes:

- the module equals its definition written out: projections, heads, (rotary), the explicit
  L x L reference favor.kernel_attention, heads merged, output projection (float64, 1e-10);
- causal self-attention fed in random pieces (state / return_state, one-token pieces go
  through favor.step) equals one pass;
- float16 / bfloat16 modules give finite outputs of their dtype;
- bad input raises ValueError / TypeError naming the argument.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import favor
from favor.nn import FavorAttention, apply_rotary
from tests.ops.test_properties import KERNELS, MASKS, rel


@st.composite
def modules(draw, *, causal=None, cross=True, rotary=None):
    h = draw(st.integers(1, 3))
    hd = draw(st.sampled_from([2, 4, 6]))
    e = h * hd
    causal = draw(st.booleans()) if causal is None else causal
    kw = {}
    if cross and not causal and draw(st.booleans()):
        kw = {"kdim": draw(st.integers(1, 7)), "vdim": draw(st.integers(1, 7))}
    kernel = draw(st.sampled_from(KERNELS))
    fa = FavorAttention(
        e,
        h,
        causal=causal,
        kernel=kernel,
        num_features=None if kernel == "elu" else draw(st.integers(1, 10)),
        projection=draw(st.sampled_from(["orthogonal", "iid", "simplex"])),
        rotary=draw(st.booleans()) if rotary is None else rotary,
        batch_first=draw(st.booleans()),
        chunk_size=draw(st.one_of(st.none(), st.integers(1, 9))),
        bias=draw(st.booleans()),
        generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16))),
        **kw,
    )
    if kernel == "oprf":  # one fixed A on every path (else causal and step pick theirs)
        fa.feature_map.rho.fill_(draw(st.floats(0.0, 2.0)))
    torch.manual_seed(draw(st.integers(0, 2**16)))  # nn.Linear's own init draws from the global generator
    for p in fa.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return fa


def _seq(fa, b, length, width, g, dtype=torch.float64):
    x = torch.randn(b, length, width, generator=g, dtype=torch.float64).to(dtype)
    return x if fa.batch_first else x.transpose(0, 1)


def _by_definition(fa, query, key, value, mask):
    """FavorAttention written out with the explicit L x L reference."""
    if not fa.batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    b = query.shape[0]

    def heads(x):
        return x.view(b, x.shape[1], fa.num_heads, fa.head_dim).transpose(1, 2)

    q, k, v = heads(fa.q_proj(query)), heads(fa.k_proj(key)), heads(fa.v_proj(value))
    if fa.rotary:
        q, k = apply_rotary(q, 0), apply_rotary(k, 0)
    out = favor.kernel_attention(q, k, v, fa.feature_map, causal=fa.causal, key_padding_mask=mask)
    out = fa.out_proj(out.transpose(1, 2).reshape(b, query.shape[1], fa.embed_dim))
    return out if fa.batch_first else out.transpose(0, 1)


@given(data=st.data())
def test_module_equals_its_definition(device, data):
    fa = data.draw(modules()).double().to(device)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    b, lq = data.draw(st.integers(1, 3)), data.draw(st.integers(0, 12))
    # a module with kdim/vdim != embed_dim is for cross-attention only
    self_attention = fa.causal or (fa.kdim == fa.vdim == fa.embed_dim and data.draw(st.booleans()))
    lk = lq if self_attention else data.draw(st.integers(0, 12))
    query = _seq(fa, b, lq, fa.embed_dim, g).to(device)
    key = None if self_attention else _seq(fa, b, lk, fa.kdim, g).to(device)
    value = None if self_attention else _seq(fa, b, lk, fa.vdim, g).to(device)
    kind = data.draw(st.sampled_from(MASKS))
    mask = {
        "none": None,
        "random": torch.rand(b, lk, generator=g) < 0.4,
        "all_padded": torch.ones(b, lk, dtype=torch.bool),
        "all_kept": torch.zeros(b, lk, dtype=torch.bool),
    }[kind]
    mask = None if mask is None else mask.to(device)
    out, weights = fa(query, key, value, key_padding_mask=mask)
    key = query if key is None else key
    value = key if value is None else value
    ref = _by_definition(fa, query, key, value, mask)
    assert weights is None and out.shape == query.shape and torch.isfinite(out).all()
    assert rel(out, ref) < 1e-10


@given(data=st.data())
def test_pieces_and_tokens_equal_one_pass(device, data):
    fa = data.draw(modules(causal=True)).double().to(device)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    b, length = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 14))
    x = _seq(fa, b, length, fa.embed_dim, g).to(device)
    whole, _ = fa(x)
    cuts = sorted(data.draw(st.lists(st.integers(1, length), max_size=5)))
    bounds = [0, *cuts, length]
    sizes = [hi - lo for lo, hi in zip(bounds, bounds[1:], strict=False) if hi > lo]
    dim = 1 if fa.batch_first else 0
    state, outs = None, []
    for piece in x.split(sizes, dim):
        out, state = fa(piece, state=state, return_state=True)
        outs.append(out)
    assert state.position == length
    assert rel(torch.cat(outs, dim), whole) < 1e-10


@given(data=st.data(), dtype=st.sampled_from([torch.float16, torch.bfloat16]))
def test_half_precision_module_is_finite(device, data, dtype):
    fa = data.draw(modules(cross=False)).to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    b, length = data.draw(st.integers(1, 3)), data.draw(st.integers(0, 12))
    x = _seq(fa, b, length, fa.embed_dim, g, dtype=dtype).to(device)
    out, _ = fa(x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    if fa.causal and length:
        out, state = fa(x, return_state=True)
        step, _ = fa(x[:, :1] if fa.batch_first else x[:1], state=state)
        assert step.dtype == dtype and torch.isfinite(step).all()


def _bad_module_cases(fa, x):
    b, length, e = x.shape
    return {
        "query 2-d": (dict(query=x[0]), ValueError, "query"),
        "query list": (dict(query=x.tolist()), ValueError, "query"),
        "embed size": (dict(query=x[..., :-1]), ValueError, "embed_dim"),
        "key size": (dict(key=x[..., :-1], value=x), ValueError, "kdim"),
        "key batch": (dict(key=torch.cat([x, x]), value=torch.cat([x, x])), ValueError, "batch"),
        "mask shape": (
            dict(key_padding_mask=torch.zeros(b, length + 1, dtype=torch.bool)),
            ValueError,
            "key_padding_mask",
        ),
        "mask dtype": (dict(key_padding_mask=torch.zeros(b, length)), TypeError, "key_padding_mask"),
        "need_weights": (dict(need_weights=True), ValueError, "need_weights"),
        "state type": (dict(state=(0, None)), TypeError, "state"),
        "state on cross-attention": (dict(key=x, return_state=True), ValueError, "state"),
        "state with mask": (
            dict(return_state=True, key_padding_mask=torch.zeros(b, length, dtype=torch.bool)),
            ValueError,
            "key_padding_mask",
        ),
    }


_MODULE_CASES = list(_bad_module_cases(None, torch.zeros(1, 1, 1)))


@pytest.mark.parametrize("case", _MODULE_CASES)
@given(data=st.data())
@settings(max_examples=3)
def test_bad_module_input_raises_naming_the_argument(case, data):
    fa = data.draw(modules(causal=True, cross=False))
    fa.batch_first = True
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    x = torch.randn(data.draw(st.integers(1, 3)), data.draw(st.integers(1, 6)), fa.embed_dim, generator=g)
    over, err, text = _bad_module_cases(fa, x)[case]
    args = dict(query=x)
    args.update(over)
    with pytest.raises(err) as info:
        fa(args.pop("query"), args.pop("key", None), args.pop("value", None), **args)
    assert text in str(info.value), str(info.value)
