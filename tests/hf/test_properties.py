"""Property tests (hypothesis) of the attention function registered with transformers
(favor.hf.interface.favor_attention_forward) over random B, H, key/value heads (GQA), Lq,
Lk (0 and 1 included), D, masks (None, padding, causal with padding and a cache offset;
bool or additive), scaling and dtypes:

- it equals an independent explicit reference: the L x L matrix phi(q_i).phi(k_j) of the
  same feature map, the 4D mask applied as given, rows normalised (a row that sees no key
  gives 0), times V (float64 1e-10, float32 1e-5);
- float16 / bfloat16 give the float32 computation rounded once;
- bad masks and shapes raise ValueError / TypeError naming the argument.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import favor
from favor.hf.adapter import FavorAdapter
from favor.hf.interface import favor_attention_forward
from tests.ops.test_properties import TOL, ULP, rel

pytest.importorskip("transformers")

#: trig is left out: its sign-indefinite normaliser is covered (with a conditioning guard)
#: in tests/ops/test_properties.py; here the subject is the mask and head handling
HF_KERNELS = ["positive", "hyperbolic", "oprf", "relu", "elu"]


class _Layer(torch.nn.Module):
    def __init__(self, adapter: FavorAdapter, is_causal: bool) -> None:
        super().__init__()
        self.favor = adapter
        self.is_causal = is_causal


@st.composite
def layers(draw, heads: int, d: int, causal: bool):
    kernel = draw(st.sampled_from(HF_KERNELS))
    if kernel == "elu":
        fm = favor.FeatureMap("elu", dim=d)
    else:
        fm = favor.FeatureMap(
            kernel,
            dim=d,
            num_features=draw(st.integers(1, 12)),
            # one fixed A for every path: the reference reads no sequence statistics
            rho=draw(st.floats(0.0, 2.0)) if kernel == "oprf" else None,
            generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16))),
        )
    return _Layer(FavorAdapter(fm, heads=heads, dim=d), causal)


@st.composite
def hf_problems(draw, *, dtypes=(torch.float64, torch.float32)):
    b, hkv = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    h = hkv * draw(st.integers(1, 2))
    d = draw(st.integers(1, 6))
    causal = draw(st.booleans())
    lk = draw(st.integers(0 if not causal else 1, 12))
    # causal: Lq == Lk (a prefill) or Lq < Lk (queries at the end of a cache)
    lq = draw(st.integers(1, lk)) if causal else draw(st.integers(0, 12))
    dtype = draw(st.sampled_from(dtypes))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    std = draw(st.floats(0.05, 1.0))
    query = (torch.randn(b, h, lq, d, generator=g, dtype=torch.float64) * std).to(dtype)
    key = (torch.randn(b, hkv, lk, d, generator=g, dtype=torch.float64) * std).to(dtype)
    value = torch.randn(b, hkv, lk, d, generator=g, dtype=torch.float64).to(dtype)
    # visibility (B, Lq, Lk): padding keys, plus causal with the queries at the end
    cols = torch.rand(b, lk, generator=g) >= draw(st.sampled_from([0.0, 0.3, 1.0]))
    vis = cols[:, None, :].expand(b, lq, lk)
    if causal:
        offset = lk - lq
        tri = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + offset
        vis = vis & tri
    form = draw(st.sampled_from(["none", "bool", "additive"]))
    if form == "none" and bool(cols.all()):
        mask = None
        if causal and lq not in (1, lk):
            # no mask and Lq < Lk: torch SDPA's is_causal convention, which transformers
            # relies on, aligns upper-left (query i sees keys 0..i)
            vis = (torch.arange(lk)[None, :] <= torch.arange(lq)[:, None]).expand(b, lq, lk)
    else:
        rows = vis[:, None] if (causal or draw(st.booleans())) else cols[:, None, None, :]
        rows = rows.expand(b, draw(st.sampled_from([1, h])), *rows.shape[-2:])
        additive = torch.zeros(rows.shape, dtype=dtype).masked_fill(~rows, torch.finfo(dtype).min)
        mask = additive if form == "additive" else rows
    scaling = draw(st.one_of(st.none(), st.floats(0.05, 1.0)))
    return query, key, value, mask, vis, scaling, causal


def _reference(layer, query, key, value, vis, scaling):
    """softmax-free L x L reference: phi(q_i).phi(k_j) of the same map (up to a per-row factor),
    the visibility applied as given, rows normalised, times V."""
    h = query.shape[1]
    rep = h // key.shape[1]
    key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    dt = torch.float64 if query.dtype == torch.float64 else torch.float32
    q, k, v = query.to(dt), key.to(dt), value.to(dt)
    if q.shape[-2] == 0 or k.shape[-2] == 0:
        return torch.zeros(q.shape[0], q.shape[-2], h, v.shape[-1], dtype=dt)
    a = favor.kernel_matrix(q, k, layer.favor.feature_map, scale=scaling, normalised=False)
    a = torch.where(vis[:, None], a, torch.zeros_like(a))
    den = a.sum(-1, keepdim=True)
    w = torch.where(den == 0, torch.zeros_like(a), a / torch.where(den == 0, torch.ones_like(den), den))
    return (w @ v).transpose(1, 2)


@given(data=st.data())
def test_hf_attention_equals_explicit_reference(device, data):
    query, key, value, mask, vis, scaling, causal = data.draw(hf_problems())
    layer = data.draw(layers(query.shape[1], query.shape[-1], causal))
    out, weights = favor_attention_forward(
        layer.to(device),
        query.to(device),
        key.to(device),
        value.to(device),
        None if mask is None else mask.to(device),
        scaling=scaling,
    )
    ref = _reference(layer.cpu(), query, key, value, vis, scaling)
    assert weights is None and out.dtype == query.dtype
    assert out.shape == (query.shape[0], query.shape[2], query.shape[1], value.shape[-1])
    assert torch.isfinite(out).all()
    assert rel(out.cpu(), ref) < TOL[query.dtype]


@given(data=st.data(), dtype=st.sampled_from([torch.float16, torch.bfloat16]))
def test_hf_attention_half_precision(device, data, dtype):
    query, key, value, mask, _, scaling, causal = data.draw(hf_problems(dtypes=(dtype,)))
    layer = data.draw(layers(query.shape[1], query.shape[-1], causal)).to(device)
    query, key, value = query.to(device), key.to(device), value.to(device)
    mask = None if mask is None else mask.to(device)
    out, _ = favor_attention_forward(layer, query, key, value, mask, scaling=scaling)
    mask32 = mask if (mask is None or mask.dtype == torch.bool) else mask.float()
    ref, _ = favor_attention_forward(layer, query.float(), key.float(), value.float(), mask32, scaling=scaling)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel(out, ref) < ULP[dtype]


def _bad_cases(query, key, value):
    b, h, lq, d = query.shape
    lk = key.shape[-2]
    pattern = torch.ones(b, 1, lq, lk, dtype=torch.bool)
    pattern[..., 0, 0] = False  # query 0 loses key 0 but query 1 keeps it: neither padding nor causal
    bias = torch.zeros(b, 1, lq, lk)
    bias[..., 0] = -0.5
    per_head = torch.ones(b, 2, lq, lk, dtype=torch.bool)
    per_head[:, 1, :, 0] = False
    return {
        "mask 3-d": (dict(attention_mask=torch.ones(b, lq, lk, dtype=torch.bool)), ValueError, "attention_mask"),
        "mask shape": (
            dict(attention_mask=torch.ones(b, 1, lq, lk + 1, dtype=torch.bool)),
            ValueError,
            "attention_mask",
        ),
        "mask integer": (dict(attention_mask=torch.ones(b, 1, lq, lk, dtype=torch.long)), TypeError, "attention_mask"),
        "mask list": (dict(attention_mask=[[1]]), TypeError, "attention_mask"),
        "mask bias": (dict(attention_mask=bias), ValueError, "attention_mask"),
        "mask pattern": (dict(attention_mask=pattern), ValueError, "attention_mask"),
        "mask per head": (dict(attention_mask=per_head, query=query.repeat(1, 2, 1, 1)), ValueError, "attention_mask"),
        "kv heads": (
            dict(query=query.repeat(1, 3, 1, 1), key=key.repeat(1, 2, 1, 1), value=value.repeat(1, 2, 1, 1)),
            ValueError,
            "heads",
        ),
        "query 3-d": (dict(query=query[0]), ValueError, "query"),
        "key dim": (dict(key=key[..., :-1]), ValueError, "head dim"),
        "value length": (dict(value=value[..., :-1, :]), ValueError, "value"),
    }


_CASES = list(_bad_cases(torch.zeros(1, 1, 2, 1), torch.zeros(1, 1, 2, 1), torch.zeros(1, 1, 2, 1)))


@pytest.mark.parametrize("case", _CASES)
@given(data=st.data())
@settings(max_examples=3)
def test_bad_hf_input_raises_naming_the_argument(case, data):
    b, lq, d = data.draw(st.integers(1, 3)), data.draw(st.integers(2, 6)), data.draw(st.integers(2, 6))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    query, key, value = (torch.randn(b, 1, lq, d, generator=g) for _ in range(3))
    over, err, text = _bad_cases(query, key, value)[case]
    args = dict(query=query, key=key, value=value, attention_mask=None)
    args.update(over)
    fm = favor.FeatureMap("positive", dim=d, num_features=4, generator=g)
    layer = _Layer(FavorAdapter(fm, heads=args["query"].shape[1] if args["query"].ndim == 4 else 1, dim=d), False)
    with pytest.raises(err) as info:
        favor_attention_forward(layer, args["query"], args["key"], args["value"], args["attention_mask"])
    assert text in str(info.value), str(info.value)
