"""fused_step (favor.ops.local.fused, favor.hf's decoding step for FAVOR+ features) against
its reference, exact_step(..., inplace=True): the same outputs after every token and the same
far state and slots at the end, for identity and general per-head maps with a key shift,
grouped key/value heads, a per-head log_const, sinks, W = 0, the ring's wrap-around, and the
state of a prompt or of steps from an empty state. The sums run in another order, so float64
agrees to 1e-10 and float32 to 1e-5 (the far state relative to its scale: an entry of kv
that cancels keeps round-off of the size of its terms)."""

from __future__ import annotations

import math

import pytest
import torch

import favor
import favor.ops.local.fused as fused
import favor.ops.local.native
from favor.ops.local.dispatch import exact_attention
from favor.ops.local.fused import LeanConstants, LeanState, fused_eligible, fused_step, ring_positions
from favor.ops.local.recurrent import SINK_MARK, ExactState, exact_step
from favor.ops.row_features import LOG2E
from favor.ops.step_features import step_features

B, H, KV, D, M, L = 2, 4, 2, 8, 16, 40


@pytest.fixture(params=[False, True], ids=["torch-ops", "compiled"])
def native(request, monkeypatch):
    """fused_step by its PyTorch ops, or with its steady-state tokens by the compiled step
    (favor.ops.local.native: it must build wherever a compiler and Python's headers are,
    ninja being a test dependency)."""
    monkeypatch.setattr(fused, "NATIVE", request.param)
    if request.param and favor.ops.local.native.load() is None:
        if favor.ops.local.native.buildable():
            pytest.fail("the compiled decoding step did not build on a machine that has a compiler and Python.h")
        pytest.skip("no C++ compiler or Python headers here: fused_step keeps its PyTorch ops")
    return request.param


TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _problem(dtype, maps: bool | str, log_const):
    """Raw q, k, v (B, H|KV, L, D), the feature map and the constants; the reference's
    inputs: features of q A and (k - c) B (scale folded into the features, as the
    adapter's), logits from q root and (k - c) root. ``maps="tied"``: B and c the same for
    the query heads of a key/value head (A per head)."""
    g = torch.Generator().manual_seed(3)
    fm = favor.FeatureMap("positive", dim=D, num_features=M, generator=torch.Generator().manual_seed(1)).to(dtype)
    q = torch.randn(B, H, L, D, dtype=dtype, generator=g)
    k, v = (torch.randn(B, KV, L, D, dtype=dtype, generator=g) for _ in range(2))
    root = D**-0.25
    f64 = torch.float64
    if maps:
        a = torch.eye(D, dtype=f64) + 0.2 * torch.randn(H, D, D, generator=g, dtype=f64)
        bm = torch.eye(D, dtype=f64) + 0.2 * torch.randn(H, D, D, generator=g, dtype=f64)  # not A^-T: drifted
        c = 0.3 * torch.randn(H, D, generator=g, dtype=f64)
        if maps == "tied":  # one key map and shift per key/value head
            bm, c = (x[:: H // KV].repeat_interleave(H // KV, 0) for x in (bm, c))
    else:
        a = bm = torch.eye(D, dtype=f64).expand(H, D, D)
        c = torch.zeros(H, D, dtype=f64)
    lc = torch.zeros(H, dtype=f64) if log_const is None else log_const.double()
    log_m = 0.5 * math.log(M)
    cq, ck = LOG2E * (lc + log_m), torch.full((H,), -log_m, dtype=f64)
    mq = bq = mk = bk = None
    if maps:
        mq = torch.cat([a * root, (-LOG2E * root * root) * c[:, :, None]], -1)
        bq = torch.cat([torch.zeros(H, 1, D, dtype=f64), cq[:, None, None]], -1)
        mk = torch.cat([bm * root, torch.zeros(H, D, 1, dtype=f64)], -1)
        bk = torch.cat([-(c[:, None, :] @ bm) * root, ck[:, None, None]], -1)

    def cast(t):
        return None if t is None else t.to(dtype).contiguous()

    consts = LeanConstants(
        cast(mq),
        cast(bq),
        cast(mk),
        cast(bk),
        None,
        cast(fm.projection.double().T * LOG2E),
        None,
        cast(cq),
        cast(ck),
        root,
    )
    rep = H // KV
    k_h, v_h = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    ks = k_h - c.to(dtype)[:, None, :]
    ref = dict(
        q=q @ a.to(dtype),
        k=ks @ bm.to(dtype),
        qx=q * root,
        kx=ks * root,
        v=v_h,
        log_const=0.0 if log_const is None else log_const.to(dtype)[:, None, None],
    )
    return fm, q, k, v, consts, ref, root


def _enter(state: ExactState, k, v, t: int, terms, **kwargs) -> LeanState:
    """The fused layout of the reference's state before position t: the raw keys and values
    of the slots' positions (empty slots: -1, as the reference keeps them)."""
    pos = ring_positions(t, terms.ring(), terms.sinks, SINK_MARK, device="cpu")
    assert torch.equal(pos, state.pos[0, 0])
    raw = torch.where(pos >= SINK_MARK, pos - SINK_MARK, pos).clamp(min=0)
    live = None if bool((pos >= 0).all()) else pos >= 0
    return LeanState.enter(state.far, k[:, :, raw], v[:, :, raw], ring=terms.ring(), live=live, **kwargs)


@pytest.mark.parametrize(
    "terms",
    [
        favor.ExactTerms(4, 2, 1),
        favor.ExactTerms(0, 0, 1),
        favor.ExactTerms(0, 3, 1),
        favor.ExactTerms(7, 0, 1),
        favor.ExactTerms(16, 3, 1),  # the prompt's state before the ring is full
    ],
    ids=str,
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("maps", [False, True, "tied"], ids=["identity", "maps", "tied"])
@pytest.mark.parametrize("prompt", [0, 12], ids=lambda p: f"prompt{p}")
@pytest.mark.parametrize("fold", [1, 3, 8], ids=lambda p: f"fold{p}")
@pytest.mark.parametrize("shared", [False, True], ids=["per-head", "shared"])
def test_fused_steps_equal_the_reference_steps(terms, dtype, maps, prompt, fold, shared, native, monkeypatch):
    """Every token's output, with the pending keys folded every ``fold`` tokens (L - prompt
    steps: the tokens before, at and after several folds, on either side of the ring's
    wrap-around), the far state kept per query head or once per key/value head; from position
    S on, so before the ring is full too (no key leaving, empty slots) where W + S allows."""
    if shared and maps is True:
        pytest.skip("a far state per key/value head needs the key side tied per group (LeanConstants.shared)")
    log_const = torch.linspace(-0.5, 0.5, H) if maps else None
    fm, q, k, v, consts, ref, root = _problem(dtype, maps, log_const)
    rows = {name: t for name, t in ref.items() if name != "log_const"}
    grew = []  # the far scale's growth (fused._grow: a key's features above 2^HEADROOM)
    real_grow = fused._grow
    monkeypatch.setattr(fused, "_grow", lambda *a: grew.append(real_grow(*a)))
    if prompt:
        p = (rows[x][..., :prompt, :] for x in ("q", "k", "v"))
        qx, kx = rows["qx"][..., :prompt, :], rows["kx"][..., :prompt, :]
        state = exact_attention(
            *p, fm, terms, causal=True, root=root, return_state=True, qx=qx, kx=kx, log_const=ref["log_const"]
        )[1]
    else:
        state = ExactState.empty((B, H), terms, D, D, M, D, dtype=dtype, device="cpu")
    lean, taken, r = None, 0, terms.ring()
    for t in range(prompt, L):
        feat, a = step_features(fm, root, rows["q"][..., t : t + 1, :], rows["k"][..., t : t + 1, :])
        step = [rows[x][..., t, :] for x in ("q", "k", "qx", "kx", "v")]
        if lean is None and fused_eligible(terms, t, prompt):  # the fused layout of the reference's state
            lean = _enter(state, k, v, t, terms, shared=shared, fold_every=fold)
        o_ref, state = exact_step(state, terms, feat, a, *step, ref["log_const"], None, inplace=True)
        if lean is not None:
            o = fused_step(lean, consts, q[..., t : t + 1, :], k[..., t : t + 1, :], v[..., t : t + 1, :], t)
            torch.testing.assert_close(o[..., 0, :], o_ref, rtol=TOL[dtype], atol=TOL[dtype])
            taken += 1
    # the steady state skips the prompt's first step (its leaving key is in the far state)
    first = prompt + 1 if prompt > terms.window + terms.sinks else max(prompt, terms.sinks, 1)
    assert taken == L - first
    assert consts.shared(KV) == (maps is not True) and lean.shared == shared
    # an empty far state (c = -inf) grows with its first key (the compiled step grows it itself)
    assert grew or prompt or native
    assert bool(torch.isfinite(lean.c).all())
    far = lean.far_state()
    for a, b in zip(state.far, far, strict=True):
        torch.testing.assert_close(b, a, rtol=TOL[dtype], atol=TOL[dtype] * max(float(a.abs().max()), 1.0))
    # the slots hold the raw keys and values of the positions exact_step keeps
    pos = state.pos[0, 0]
    raw = torch.where(pos >= SINK_MARK, pos - SINK_MARK, pos)
    assert torch.equal(ring_positions(L, r, terms.sinks, SINK_MARK, device="cpu"), pos)
    lk, lv = lean.raw()
    assert torch.equal(lk, k[:, :, raw]) and torch.equal(lv, v[:, :, raw])


@pytest.mark.parametrize("shared", [False, True], ids=["per-head", "shared"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_the_far_state_read_between_folds_is_the_references_and_steps_go_on(shared, dtype, native):
    """far_state() after every token (0 .. P pending keys: it folds them) equals exact_step's,
    and the steps after it still give the reference's outputs."""
    terms = favor.ExactTerms(3, 2, 1)
    fm, q, k, v, consts, ref, root = _problem(dtype, False, None)
    rows = {name: t for name, t in ref.items() if name != "log_const"}
    state = ExactState.empty((B, H), terms, D, D, M, D, dtype=dtype, device="cpu")
    lean, tol = None, TOL[dtype]
    for t in range(L):
        feat, a = step_features(fm, root, rows["q"][..., t : t + 1, :], rows["k"][..., t : t + 1, :])
        step = [rows[x][..., t, :] for x in ("q", "k", "qx", "kx", "v")]
        if lean is None and fused_eligible(terms, t, 0):
            lean = _enter(state, k, v, t, terms, shared=shared, fold_every=4)
        o_ref, state = exact_step(state, terms, feat, a, *step, 0.0, None, inplace=True)
        if lean is None:
            continue
        o = fused_step(lean, consts, q[..., t : t + 1, :], k[..., t : t + 1, :], v[..., t : t + 1, :], t)
        torch.testing.assert_close(o[..., 0, :], o_ref, rtol=tol, atol=tol)
        if t % 3:  # reads at pending counts 1, 2, 3, 4 and right after a fold (none pending before W + S + 1)
            assert 0 < lean.count <= 4 if t >= lean.steady else lean.count == 0
            for a, b in zip(state.far, lean.far_state(), strict=True):
                torch.testing.assert_close(b, a, rtol=tol, atol=tol * max(float(a.abs().max()), 1.0))
            assert lean.count == 0
