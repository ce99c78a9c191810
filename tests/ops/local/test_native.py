"""The compiled decoding step (favor.ops.local.native, fused_native.cpp: the steady state and
the tokens before the ring is full) against
fused_step's PyTorch ops on the same states: every token's output and the state after it
(float64 to 1e-10, float32 to 1e-5; the far state relative to its scale), for the decoder
recipe's constants (per-head maps, gain, feature bias, the e column, a key side tied per
group or not). The reference tests of both paths against exact_step are in
test_fused_step.py and tests/hf/test_lean_decode.py. Also: the switch, a failed build,
and a NaN input left to the PyTorch path."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import favor.hf as fh
import favor.ops.local.fused as fused
from favor.ops.local import native

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.fixture
def built():
    module = native.load()
    if module is None:
        if native.buildable():
            pytest.fail("the compiled decoding step did not build on a machine that has a compiler and Python.h")
        pytest.skip("no C++ compiler or Python headers here: fused_step keeps its PyTorch ops")
    return module


def _layer(tiny_llama, calibrated, dtype, window=6, sinks=2):
    """A tiny GQA decoder performerized with the recipe's constants (tests/hf/test_lean_decode.py's
    _model: per-head maps, dense gain and bias, the e column, tied or not)."""
    from tests.hf.test_lean_decode import _model

    return _model(tiny_llama, window=window, sinks=sinks, calibrated=calibrated, dtype=dtype)


@pytest.mark.parametrize("calibrated", [False, True, "distilled", "tied"], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_the_compiled_step_equals_the_torch_ops_step(tiny_llama, built, monkeypatch, calibrated, dtype):
    _compare(_layer(tiny_llama, calibrated, dtype), built, monkeypatch, dtype)


def _wide_llama(heads: int, kv_heads: int, head_dim: int = 40):
    """A tiny Llama with SmolLM2's kind of head: value rows of head_dim + 1 = 41 columns, so
    the compiled step's register blocks of value columns (32 floats, 16 doubles) run with a
    remainder; ``heads / kv_heads`` query heads per key/value head."""
    from tests.hf.conftest import _tiny_llama

    def make():
        return _tiny_llama(
            hidden_size=heads * head_dim, num_hidden_layers=1, num_attention_heads=heads, num_key_value_heads=kv_heads
        )

    return make


# query heads per key/value head 1, 2, 3 and 4 (blocked per count) and 6 (the plain loop)
@pytest.mark.parametrize("heads,kv_heads", [(3, 3), (4, 2), (3, 1), (4, 1), (6, 1)], ids=str)
@pytest.mark.parametrize("calibrated", ["distilled", "tied"], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_the_compiled_step_equals_the_torch_ops_step_with_wide_heads(
    built, monkeypatch, heads, kv_heads, calibrated, dtype
):
    model = _layer(_wide_llama(heads, kv_heads), calibrated, dtype, window=20, sinks=2)
    _compare(model, built, monkeypatch, dtype, length=36)


def _compare(model, built, monkeypatch, dtype, length: int = 40) -> None:
    """Greedy tokens of ``model`` through the compiled step and through fused_step's ops:
    logits and the states after them equal to TOL."""
    ids = torch.randint(1, 50, (2, length), generator=torch.Generator().manual_seed(4))
    monkeypatch.setattr(fused, "FOLD_EVERY", 3)
    runs, steps, unwrapped = {}, [], []
    real = built.Stepper

    class Counted:  # the compiled path must run (and not hand every token back)
        def __init__(self, *a):
            self.s = real(*a)

        def step(self, *a):
            out = self.s.step(*a)
            steps.append(out is not None)
            return out

        def unwrapped(self, *a):  # before the ring is full
            unwrapped.append(1)
            return self.s.unwrapped(*a)

    for compiled in (False, True):
        monkeypatch.setattr(fused, "NATIVE", compiled)
        monkeypatch.setattr(native, "load", lambda: type("M", (), {"Stepper": Counted}))
        cache, out = fh.FavorCache(model), []
        with torch.no_grad():
            out.append(model(input_ids=ids[:, :5], cache=cache, use_cache=True).logits)
            for t in range(5, ids.shape[1]):
                out.append(model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True).logits)
        runs[compiled] = (torch.cat(out, 1), [copy.deepcopy(layer.state) for layer in cache.layers])
    # every steady-state token by the compiled step (it grows the far scale itself; None is for NaN only)
    assert steps and all(steps)
    assert unwrapped  # positions S .. W + S
    tol = TOL[dtype]
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=tol, atol=tol)
    for a, b in zip(runs[False][1], runs[True][1], strict=True):
        for x, y in zip((*a.far, *a[1:]), (*b.far, *b[1:]), strict=True):
            torch.testing.assert_close(y, x, rtol=tol, atol=tol * max(float(x.abs().max()), 1.0))


def test_favor_native_0_turns_it_off(monkeypatch):
    monkeypatch.setenv("FAVOR_NATIVE", "0")
    assert not native.enabled() and native.load() is None


def test_a_failed_build_leaves_the_torch_ops_with_a_warning(monkeypatch, caplog):
    from torch.utils import cpp_extension

    def fail(**kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(cpp_extension, "load", fail)
    native._build.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="favor.ops.local.native"):
            assert native.load() is None
        assert "no compiler here" in caplog.text
    finally:
        native._build.cache_clear()


def test_a_nan_key_is_handed_back_to_the_torch_ops(tiny_llama, built):
    """NaN in a leaving key's features: the compiled step changes nothing and returns None,
    and fused_step's PyTorch ops take that token (where NaN propagates: no silent number)."""
    model = _layer(tiny_llama, "distilled", torch.float64)
    ids = torch.randint(1, 50, (1, 16), generator=torch.Generator().manual_seed(6))
    cache = fh.FavorCache(model)
    with torch.no_grad():
        model(input_ids=ids, cache=cache, use_cache=True)
        for t in range(2):  # the prompt's first step takes the general path, the next the fused one
            model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True)
    lean = cache.layers[0].lean
    assert lean is not None and lean.stepper is not None
    before = [t.clone() for t in lean.tensors()]
    lean.k[:, lean.length % lean.ring].fill_(float("nan"))  # the key that leaves next
    b, h, d = 1, lean.heads, lean.k.shape[-1]
    q = torch.randn(b, h, 1, d, dtype=torch.float64)
    k, v = torch.randn(2, b, lean.kv_heads, 1, d, dtype=torch.float64)
    assert lean.stepper.step(q, k, v[..., : lean.dv], lean.length % lean.ring, lean.count) is None
    after = lean.tensors()
    # c, vals, pend (and kvz) untouched; the keys hold the NaN put there
    assert all(torch.equal(x, y) for i, (x, y) in enumerate(zip(before, after, strict=True)) if i != 1)
    with torch.no_grad():  # the model's next token: the ops take it, and the NaN shows
        logits = model(input_ids=ids[:, :1], cache=cache, use_cache=True).logits
    assert bool(logits.isnan().any())


def test_a_machine_with_a_compiler_and_headers_builds_it():
    """Where the build has what it needs (CI's machine: gcc, Python's headers, ninja from the
    dev extras) a failed build is a defect, not a reason to skip."""
    if not native.buildable():
        pytest.skip("no C++ compiler or Python headers here")
    assert native.load() is not None
