"""Property tests (hypothesis) of favor.attention and favor.step over random shapes (batch,
heads, Lq, Lk including 0 and 1, D, Dv), masks (none, random, all padded, all kept),
dtypes, chunk sizes, kernels, projections and stabilizers:

- every path equals the explicit L x L reference (favor.kernel_attention), outputs and
  gradients, to the numerics contract's tolerance (float64 1e-10, float32 1e-5, relative to
  the output's largest entry);
- streaming a causal sequence in random pieces (initial_state / return_state) and token by
  token (favor.step) equals one pass, gradients through the state included;
- float16 / bfloat16 inputs give the float32 computation on the same (rounded) inputs, cast
  once; finite inputs with logits within the contract's +-60 give finite outputs;
- bad input raises ValueError / TypeError naming the argument.

Profiles: tests/conftest.py (default bounded and derandomised; HYPOTHESIS_PROFILE=slow for many more).
"""

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import favor

KERNELS = ["positive", "hyperbolic", "trig", "oprf", "relu", "elu"]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
#: half an ulp at 1.0 (the one rounding of the output) for the half-precision types
ULP = {torch.float16: 2**-10, torch.bfloat16: 2**-7}
MASKS = ["none", "random", "all_padded", "all_kept"]


def rel(a: torch.Tensor, b: torch.Tensor, unit: float = 1e-30) -> float:
    """max |a - b| / max(max |b|, unit) (with the default unit an all-zero reference must be
    matched exactly)."""
    if b.numel() == 0:
        return 0.0
    err = (a.double() - b.double()).abs().max().item()
    return err / max(b.double().abs().max().item(), unit)


def grad_unit(q, k, v, w) -> float:
    """The scale of the gradients of sum(out * w): dL/dv ~ |w|, dL/dq and dL/dk ~
    |w| |v| |k| or |q| (times scale). A gradient that is 0 in exact arithmetic (one key, say)
    is compared at this scale, not at 0."""
    top = [t.abs().max().item() for t in (q, k, v, w) if t.numel()]
    return max(top) ** 3 if top else 1.0


# -- strategies -----------------------------------------------------------------------------


@st.composite
def feature_maps(draw, d: int, *, streaming: bool = False):
    """Any kernel, projection kind, norm and number of features M; the official stabilizer
    where it exists (not for streaming, which it cannot do)."""
    kernel = draw(st.sampled_from(KERNELS))
    if kernel == "elu":
        return favor.FeatureMap("elu", dim=d)
    projection = draw(st.sampled_from(["orthogonal", "iid"] + (["simplex"] if d >= 2 else [])))
    norm = draw(st.sampled_from(["chi", "sqrt_d"])) if projection == "orthogonal" else "chi"
    stabilizer = "exact"
    if not streaming and kernel in ("positive", "trig", "relu"):
        stabilizer = draw(st.sampled_from(["exact", "official"]))
    rho = None
    if kernel == "oprf" and draw(st.booleans()):
        rho = draw(st.floats(0.0, 2.0))
    return favor.FeatureMap(
        kernel,
        dim=d,
        num_features=draw(st.integers(1, 12)),
        projection=projection,
        norm=norm,
        stabilizer=stabilizer,
        rho=rho,
        generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16))),
    )


@st.composite
def problems(draw, *, causal: bool, dtypes=(torch.float64, torch.float32), broadcast: bool = True, max_len: int = 24):
    """(q, k, v, key_padding_mask, info): inputs drawn from N(0, std^2), std <= 1 and D <= 8,
    so |q.k| scale stays well inside the contract's +-60."""
    lead = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    lq = draw(st.integers(0, max_len))
    lk = lq if causal else draw(st.integers(0, max_len))
    d, dv = draw(st.integers(1, 8)), draw(st.integers(1, 6))
    dtype = draw(st.sampled_from(dtypes))
    kv_lead = lead
    if broadcast and lead and draw(st.booleans()):
        # keys/values shared over the last leading dim (e.g. one key head for all query heads)
        kv_lead = lead[:-1] + (1,)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    std = draw(st.floats(0.05, 1.0))

    def rand(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype)

    q, k, v = rand(*lead, lq, d, s=std), rand(*kv_lead, lk, d, s=std), rand(*kv_lead, lk, dv)
    kind = draw(st.sampled_from(MASKS))
    # (B, Lk) when there is a batch dim, else k's own rows (Lk,)
    mask_shape = (k.shape[0], lk) if lead and draw(st.booleans()) else tuple(k.shape[:-1])
    mask = {
        "none": None,
        "random": torch.rand(mask_shape, generator=g) < draw(st.floats(0.0, 1.0)),
        "all_padded": torch.ones(mask_shape, dtype=torch.bool),
        "all_kept": torch.zeros(mask_shape, dtype=torch.bool),
    }[kind]
    return q, k, v, mask


def chunks():
    return st.one_of(st.none(), st.integers(1, 30))


def condition(q, k, fm, *, causal, mask) -> float:
    """The largest row condition number sum |a_ij| / |sum a_ij| of the normaliser: 1 for the
    positive kernels, large for trig rows whose sign-indefinite normaliser nearly cancels
    (each rounding error is amplified that much, in a gradient once more)."""
    if fm.kernel != "trig" or q.shape[-2] == 0 or k.shape[-2] == 0:
        return 1.0
    a = favor.kernel_matrix(q.double(), k.double(), fm, causal=causal, key_padding_mask=mask, normalised=False)
    mass = a.abs().sum(-1)
    cond = torch.where(mass == 0, torch.ones_like(mass), mass / a.sum(-1).abs().clamp_min(1e-300))
    return max(1.0, cond.max().item())


def well_conditioned(q, k, fm, *, causal, mask) -> bool:
    """Rows of condition number above 1e3 are ill-conditioned, not wrong: left out of the
    comparisons (whose error bound is then at most 1e3 * tol)."""
    return condition(q, k, fm, causal=causal, mask=mask) < 1e3


def to(device, *ts):
    return tuple(None if t is None else t.to(device) for t in ts)


# -- fast paths equal the reference -------------------------------------------------------


@given(data=st.data(), causal=st.booleans())
def test_attention_equals_reference(device, data, causal):
    q, k, v, mask = data.draw(problems(causal=causal))
    fm = data.draw(feature_maps(q.shape[-1]))
    chunk = data.draw(chunks())
    assume(well_conditioned(q, k, fm, causal=causal, mask=mask))
    q, k, v, mask = to(device, q, k, v, mask)
    fm = fm.to(device)
    out = favor.attention(q, k, v, fm, causal=causal, key_padding_mask=mask, chunk_size=chunk)
    ref = favor.kernel_attention(q, k, v, fm, causal=causal, key_padding_mask=mask)
    lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    assert out.shape == (*lead, q.shape[-2], v.shape[-1]) and out.dtype == v.dtype and out.device == q.device
    assert torch.isfinite(out).all()
    assert rel(out, ref) < TOL[q.dtype]
    if mask is not None and bool(mask.all()):  # no visible key: exact zeros, not NaN
        assert torch.equal(out, torch.zeros_like(out))


@given(data=st.data(), causal=st.booleans())
def test_gradients_equal_reference(device, data, causal):
    q, k, v, mask = data.draw(problems(causal=causal, max_len=16))
    fm = data.draw(feature_maps(q.shape[-1]))
    chunk = data.draw(chunks())
    cond = condition(q, k, fm, causal=causal, mask=mask)
    assume(cond < 1e3)
    wants = data.draw(st.sampled_from([(a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1) if a or b or c]))
    q, k, v, mask = to(device, q, k, v, mask)
    fm = fm.to(device)
    inputs = [t.requires_grad_(bool(w)) for t, w in zip((q, k, v), wants, strict=True)]
    lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    w = torch.randn(*lead, q.shape[-2], v.shape[-1], generator=torch.Generator().manual_seed(7), dtype=q.dtype)
    w = w.to(device)
    grads = []
    for fn in (
        lambda: favor.attention(q, k, v, fm, causal=causal, key_padding_mask=mask, chunk_size=chunk),
        lambda: favor.kernel_attention(q, k, v, fm, causal=causal, key_padding_mask=mask),
    ):
        wanted = [t for t in inputs if t.requires_grad]
        grads.append(torch.autograd.grad((fn() * w).sum(), wanted, allow_unused=True))
    for fast, ref in zip(*grads, strict=True):
        fast = torch.zeros_like(ref) if fast is None and ref is not None else fast
        ref = torch.zeros_like(fast) if ref is None else ref
        assert torch.isfinite(fast).all()
        # a gradient sums over L rows: its round-off grows with the rows behind each entry;
        # and d(num/den) carries 1/den once more than the output: one more factor of cond
        unit = grad_unit(q, k, v, w)
        assert rel(fast, ref, unit) < TOL[q.dtype] * max(1, q.shape[-2], k.shape[-2]) ** 0.5 * cond


# -- streaming ----------------------------------------------------------------------------


def _pieces(draw, length: int) -> list[int]:
    cuts = sorted(draw(st.lists(st.integers(0, length), max_size=4)))
    bounds = [0, *cuts, length]
    return [b - a for a, b in zip(bounds, bounds[1:], strict=False)]  # pieces of length 0 included


@given(data=st.data())
def test_streaming_in_random_pieces_equals_one_pass(device, data):
    q, k, v, _ = data.draw(problems(causal=True, broadcast=False))
    fm = data.draw(feature_maps(q.shape[-1], streaming=True))
    sizes = _pieces(data.draw, q.shape[-2])
    chunk = data.draw(chunks())
    # trig rows whose normaliser nearly cancels amplify the round-off of either order of
    # summation by their condition number (1 for the positive kernels)
    cond = condition(q, k, fm, causal=True, mask=None)
    assume(cond < 1e3)
    q, k, v = to(device, q, k, v)
    fm = fm.to(device)
    for t in (q, k, v):
        t.requires_grad_()
    whole, final = favor.attention(q, k, v, fm, causal=True, chunk_size=chunk, return_state=True)
    outs, state = [], None
    for qs, ks, vs in zip(q.split(sizes, -2), k.split(sizes, -2), v.split(sizes, -2), strict=True):
        out, state = favor.attention(
            qs, ks, vs, fm, causal=True, chunk_size=chunk, initial_state=state, return_state=True
        )
        outs.append(out)
    pieces = torch.cat(outs, -2)
    tol = TOL[q.dtype]
    assert rel(pieces, whole) < tol * cond
    # the same state: the sums kv exp(log_scale), z exp(log_scale) agree to round-off (the log
    # scales are maxima over the same keys, equal up to the round-off of each key's features,
    # which a matmul over a different number of rows may change in the last bit)
    torch.testing.assert_close(state.log_scale, final.log_scale, rtol=tol, atol=tol)  # -inf == -inf: empty
    factor = torch.exp(state.log_scale - final.log_scale).nan_to_num(1.0)  # -inf - -inf: an empty state
    assert rel(state.kv * factor[..., None, None], final.kv) < tol
    assert rel(state.z * factor[..., None], final.z) < tol
    # gradients flow back through the state from piece to piece
    w = torch.randn(pieces.shape, generator=torch.Generator().manual_seed(3), dtype=q.dtype).to(device)
    g_pieces = torch.autograd.grad((pieces * w).sum() + state.kv.sum(), (q, k, v))
    g_whole = torch.autograd.grad((whole * w).sum() + final.kv.sum(), (q, k, v))
    unit = grad_unit(q, k, v, w)
    for a, b in zip(g_pieces, g_whole, strict=True):
        assert rel(a, b, unit) < tol * max(1, q.shape[-2]) ** 0.5 * cond


@given(data=st.data())
def test_step_token_by_token_equals_causal(device, data):
    dtype = data.draw(st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]))
    q, k, v, _ = data.draw(problems(causal=True, dtypes=(dtype,), broadcast=False, max_len=12))
    fm = data.draw(feature_maps(q.shape[-1], streaming=True))
    scale = data.draw(st.one_of(st.none(), st.floats(0.01, 2.0)))
    q, k, v = to(device, q, k, v)
    fm = fm.to(device)
    ref_dtype = torch.float32 if dtype in ULP else dtype
    whole = favor.attention(q.to(ref_dtype), k.to(ref_dtype), v.to(ref_dtype), fm, causal=True, scale=scale)
    state, outs = None, []
    for t in range(q.shape[-2]):
        out, state = favor.step(state, q[..., t, :], k[..., t, :], v[..., t, :], fm, scale=scale)
        assert out.dtype == dtype and out.device == q.device
        outs.append(out)
    if not outs:
        return
    steps = torch.stack(outs, -2)
    assert torch.isfinite(steps).all()
    # half precision: the float32 computation, rounded once at the end (half an ulp, and the
    # step's float32 round-off on top: 1e-5)
    assert rel(steps, whole) < (ULP[dtype] + 1e-5 if dtype in ULP else TOL[dtype])


# -- half precision and finiteness ---------------------------------------------------------


@given(data=st.data(), causal=st.booleans(), dtype=st.sampled_from([torch.float16, torch.bfloat16]))
def test_half_precision_is_float32_rounded_once(device, data, causal, dtype):
    q, k, v, mask = data.draw(problems(causal=causal, dtypes=(dtype,)))
    fm = data.draw(feature_maps(q.shape[-1]))
    chunk = data.draw(chunks())
    assume(well_conditioned(q, k, fm, causal=causal, mask=mask))
    q, k, v, mask = to(device, q, k, v, mask)
    fm = fm.to(device)
    out = favor.attention(q, k, v, fm, causal=causal, key_padding_mask=mask, chunk_size=chunk)
    ref = favor.attention(q.float(), k.float(), v.float(), fm, causal=causal, key_padding_mask=mask, chunk_size=chunk)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel(out, ref) < ULP[dtype]


@given(
    data=st.data(),
    causal=st.booleans(),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]),
    logit=st.floats(0.0, 60.0),
)
def test_finite_inputs_give_finite_outputs(device, data, causal, dtype, logit):
    """Rows of q and k rescaled so that the largest |q.k| scale is ``logit`` (up to the
    contract's 60): no overflow anywhere, in any dtype, for the softmax kernels (exact
    stabilizer) and the deterministic-range ones."""
    q, k, v, mask = data.draw(problems(causal=causal, dtypes=(torch.float64,)))
    fm = data.draw(feature_maps(q.shape[-1]))
    assume(fm.stabilizer == "exact" and fm.kernel != "trig")  # trig: see well_conditioned
    chunk = data.draw(chunks())
    d = q.shape[-1]
    if q.numel() and k.numel():
        top = (q @ k.transpose(-1, -2)).abs().max() / math.sqrt(d)
        factor = math.sqrt(logit / top.item()) if top > 0 else 1.0
        q, k = q * factor, k * factor
    q, k, v, mask = to(device, q.to(dtype), k.to(dtype), v.to(dtype), mask)
    fm = fm.to(device)
    for t in (q, k, v):
        t.requires_grad_()
    out = favor.attention(q, k, v, fm, causal=causal, key_padding_mask=mask, chunk_size=chunk)
    assert torch.isfinite(out).all()
    grads = torch.autograd.grad(out.float().sum(), (q, k, v), allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)


# -- bad input ------------------------------------------------------------------------------


def _bad_attention_cases(q, k, v, fm):
    """name -> (kwargs overrides, expected error, text the message must contain)."""
    b = q.shape[0]
    lk, d = k.shape[-2], q.shape[-1]
    other = torch.float64 if v.dtype != torch.float64 else torch.float32
    return {
        "q not a tensor": (dict(q=q.tolist()), TypeError, "q must be a torch.Tensor"),
        "k integer": (dict(k=k.long()), TypeError, "k must be a floating-point"),
        "v complex": (dict(v=v.to(torch.complex64)), TypeError, "v must be a floating-point"),
        "v other dtype": (dict(v=v.to(other)), TypeError, "share a dtype"),
        "q 1-d": (dict(q=q[0, 0, 0]), ValueError, "q must have shape"),
        "q head dim": (dict(q=torch.cat([q, q[..., :1]], -1)), ValueError, "head dim D"),
        "D = 0": (dict(q=q[..., :0], k=k[..., :0]), ValueError, "head dim D"),
        "v length": (dict(v=torch.cat([v, v[..., :1, :]], -2)), ValueError, "share the length Lk"),
        "lead": (
            dict(q=torch.cat([q] * 2), k=torch.cat([k] * 3), v=torch.cat([v] * 3)),
            ValueError,
            "do not broadcast",
        ),
        "causal Lq != Lk": (dict(q=torch.cat([q, q], -2), causal=True), ValueError, "Lq == Lk"),
        "feature map": (dict(feature_map="positive"), TypeError, "feature_map"),
        "feature map dim": (dict(feature_map=favor.FeatureMap("positive", dim=d + 1)), ValueError, "dim="),
        "mask dtype": (dict(key_padding_mask=torch.zeros(b, lk)), TypeError, "key_padding_mask"),
        "mask shape": (dict(key_padding_mask=torch.zeros(b, lk + 1, dtype=torch.bool)), ValueError, "key_padding_mask"),
        "mask list": (dict(key_padding_mask=[[False] * lk] * b), TypeError, "key_padding_mask"),
        "mask device": (
            dict(key_padding_mask=torch.zeros(b, lk, dtype=torch.bool, device="meta")),
            ValueError,
            "key_padding_mask",
        ),
        "scale 0": (dict(scale=0.0), ValueError, "scale"),
        "scale nan": (dict(scale=float("nan")), ValueError, "scale"),
        "scale str": (dict(scale="1"), TypeError, "scale"),
        "scale tensor": (dict(scale=torch.tensor(0.5)), TypeError, "scale"),
        "chunk 0": (dict(chunk_size=0), ValueError, "chunk_size"),
        "chunk float": (dict(chunk_size=2.0), ValueError, "chunk_size"),
        "chunk bool": (dict(chunk_size=True), ValueError, "chunk_size"),
        "state not causal": (dict(return_state=True), ValueError, "causal"),
        "state official": (
            dict(
                causal=True, return_state=True, feature_map=favor.FeatureMap("positive", dim=d, stabilizer="official")
            ),
            ValueError,
            "stabilizer",
        ),
        "state type": (dict(causal=True, initial_state=(1, 2, 3)), TypeError, "initial_state"),
        "state shape": (
            dict(causal=True, initial_state=favor.State.empty((b + 1,), 3, v.shape[-1])),
            ValueError,
            "initial_state",
        ),
        "state device": (
            dict(causal=True, initial_state=favor.State.empty(tuple(q.shape[:-2]), 4, v.shape[-1], device="meta")),
            ValueError,
            "initial_state",
        ),
    }


_ATTENTION_CASES = list(_bad_attention_cases(*(torch.zeros(1, 1, 1, 1),) * 3, None))


@pytest.mark.parametrize("case", _ATTENTION_CASES)
@given(data=st.data())
@settings(max_examples=3)
def test_bad_attention_input_raises_naming_the_argument(case, data):
    b, h, length = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3)), data.draw(st.integers(1, 9))
    d, dv = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 4))
    dtype = data.draw(st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    q, k, v = (torch.randn(b, h, length, n, generator=g).to(dtype) for n in (d, d, dv))
    fm = favor.FeatureMap("positive", dim=d, num_features=4, generator=g)
    over, err, text = _bad_attention_cases(q, k, v, fm)[case]
    args = dict(q=q, k=k, v=v, feature_map=fm)
    args.update(over)
    with pytest.raises(err) as info:
        favor.attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("feature_map"), **args)
    assert text in str(info.value), str(info.value)


def _bad_step_cases(q, k, v, fm, state):
    d = q.shape[-1]
    other = torch.float64 if v.dtype != torch.float64 else torch.float32
    wide = torch.ones(*q.shape[:-1], d + 1, dtype=q.dtype)
    return {
        "q not a tensor": (dict(q=q.tolist()), TypeError, "q must be"),
        "k integer": (dict(k=k.long()), TypeError, "k must be"),
        "v 0-d": (dict(v=v[..., 0].sum()), TypeError, "v must be"),
        "v other dtype": (dict(v=v.to(other)), TypeError, "share a dtype"),
        "k head dim": (dict(k=torch.cat([k, k[..., :1]], -1)), ValueError, "head dim D"),
        "D = 0": (dict(q=q[..., :0], k=k[..., :0]), ValueError, "head dim D"),
        "feature map dim": (dict(q=wide, k=wide), ValueError, "dim="),
        "lead": (
            dict(q=torch.cat([q] * 2), k=torch.cat([k] * 3), v=torch.cat([v] * 3)),
            ValueError,
            "do not broadcast",
        ),
        "device": (dict(v=v.to("meta")), ValueError, "one device"),
        "feature map": (dict(feature_map=None), TypeError, "feature_map"),
        "official": (
            dict(feature_map=favor.FeatureMap("positive", dim=d, stabilizer="official")),
            ValueError,
            "stabilizer",
        ),
        "scale": (dict(scale=-1.0), ValueError, "scale"),
        "state type": (dict(state=(1, 2, 3)), TypeError, "state"),
        "state lead": (dict(state=favor.State.empty((q.shape[0] + 1,), 4, v.shape[-1])), ValueError, "state"),
        "state dv": (dict(state=favor.State.empty(tuple(q.shape[:-1]), 4, v.shape[-1] + 1)), ValueError, "state"),
        "state M": (dict(state=favor.State.empty(tuple(q.shape[:-1]), 5, v.shape[-1])), ValueError, "state"),
        "state device": (dict(state=None if state is None else state.to("meta")), ValueError, "state"),
    }


_STEP_CASES = list(_bad_step_cases(*(torch.zeros(1, 1),) * 3, None, None))


@pytest.mark.parametrize("case", _STEP_CASES)
@given(data=st.data())
@settings(max_examples=3)
def test_bad_step_input_raises_naming_the_argument(case, data):
    b, d, dv = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 6)), data.draw(st.integers(1, 4))
    dtype = data.draw(st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    q, k, v = (torch.randn(b, n, generator=g).to(dtype) for n in (d, d, dv))
    fm = favor.FeatureMap("positive", dim=d, num_features=4, generator=g)
    _, state = favor.step(None, q, k, v, fm)
    over, err, text = _bad_step_cases(q, k, v, fm, state)[case]
    args = dict(state=state, q=q, k=k, v=v, feature_map=fm)
    args.update(over)
    with pytest.raises(err) as info:
        favor.step(args.pop("state"), args.pop("q"), args.pop("k"), args.pop("v"), args.pop("feature_map"), **args)
    assert text in str(info.value), str(info.value)
