"""favor.hf's lean decoding step (decode._exact_lean: one token, no padding, C = 1, past the
sinks and the first step after the prompt) against the general step it replaces
(favor.ops.local exact_step through exact_attention): the same logits and the same cache
state after every token, float64 to 1e-10 and float32 to 1e-5; shapes it does not take
(key padding, blocks) run the general step. A GQA Llama (4 query heads, 2 key/value heads)
with the decoder recipe's adapters (dense features), calibrated or not."""

from __future__ import annotations

import pytest
import torch

import favor.hf as fh
import favor.hf.decode as decode
import favor.ops.local.fused as fused

PROMPT, NEW = 5, 14


def _model(tiny_llama, *, window, sinks, block=1, calibrated=False, dtype=torch.float64):
    model = fh.performerize(
        tiny_llama(), num_features=16, seed=0, exact_window=window, exact_sinks=sinks, exact_block=block
    ).to(dtype)
    if calibrated:  # a reparametrisation that is not the identity: transform's maps run
        g = torch.Generator().manual_seed(5)
        for m in model.modules():
            if isinstance(m, fh.FavorAdapter):
                a = torch.eye(m.dim, dtype=torch.float64) + 0.1 * torch.randn(
                    m.heads, m.dim, m.dim, generator=g, dtype=torch.float64
                )
                m.set_reparametrisation(0.1 * torch.randn(m.heads, m.dim, generator=g, dtype=torch.float64), a)
                # dense-exponential a_i < 0: the fused step's gain kappa b and feature bias a w^2 run
                m.set_dense(-0.1 * torch.rand(m.heads, m.dim, generator=g, dtype=torch.float64))
                if calibrated in ("drifted", "distilled"):  # as fitting leaves them: the key map no longer A^-T
                    m.key_map.add_(0.1 * torch.randn(m.key_map.shape, generator=g, dtype=m.key_map.dtype))
                if calibrated in ("distilled", "tied"):  # distillation trains every projection column, e's too
                    proj = m.feature_map.projection
                    proj.add_(0.05 * torch.randn(proj.shape, generator=g, dtype=proj.dtype))
                if calibrated == "tied":  # the key side tied per key/value head (distill's tie_keys)
                    groups = m.heads // model.config.num_key_value_heads
                    for t in (m.key_map, m.key_shift, m.dense_a):
                        t.copy_(t[::groups].repeat_interleave(groups, 0))
    return model


def _decode(model, ids, mask=None, *, lean: bool | str, monkeypatch):
    """Logits of a prompt then one token per call, the cache, and how many lean steps ran
    (``lean``: True, the fused step where it applies, else exact_step_lean; "unfused":
    exact_step_lean only; False: the general step only)."""
    calls = []

    def counted(real):
        def step(*args, **kwargs):
            calls.append(1)
            return real(*args, **kwargs)

        return step

    monkeypatch.setattr(decode, "exact_step_lean", counted(decode.exact_step_lean))
    monkeypatch.setattr(decode, "fused_step", counted(decode.fused_step))
    if lean == "unfused":
        monkeypatch.setattr(decode, "_exact_fused", lambda *a: None)
    if not lean:
        monkeypatch.setattr(decode, "lean_eligible", lambda *a: False)
        monkeypatch.setattr(decode, "fused_eligible", lambda *a: False)
    cache, out = fh.FavorCache(model), []
    with torch.no_grad():
        for lo, hi in [(0, PROMPT)] + [(i, i + 1) for i in range(PROMPT, ids.shape[1])]:
            extra = {} if mask is None else {"attention_mask": mask[:, :hi]}
            out.append(model(input_ids=ids[:, lo:hi], cache=cache, use_cache=True, **extra).logits)
    monkeypatch.undo()
    return torch.cat(out, 1), cache, len(calls)


def _state(cache) -> list[torch.Tensor]:
    return [t for layer in cache.layers for t in (*layer.state.far, *layer.state[1:])]


# (8, 2), (12, 0), (9, 6): the fused step's unwrapped phase (positions S .. W + S, the ring
# not yet full; with (8, 2) it wraps into the slots the sinks left empty, with (9, 6) the
# prompt is shorter than the sinks), then the steady state
@pytest.mark.parametrize("window,sinks", [(3, 2), (0, 0), (0, 2), (4, 0), (8, 2), (12, 0), (9, 6)])
@pytest.mark.parametrize("calibrated", [False, True, "drifted", "distilled", "tied"], ids=str)
@pytest.mark.parametrize("lean", [True, "unfused"], ids=["fused", "unfused"])
@pytest.mark.parametrize("fold", [2, 8], ids=lambda p: f"fold{p}")
def test_lean_decoding_equals_the_general_step_and_teacher_forcing(
    tiny_llama, monkeypatch, window, sinks, calibrated, lean, fold
):
    if lean == "unfused" and fold != 8:
        pytest.skip("exact_step_lean keeps no pending keys")
    monkeypatch.setattr(fused, "FOLD_EVERY", fold)  # folds before, at and after the state is read
    model = _model(tiny_llama, window=window, sinks=sinks, calibrated=calibrated)
    ids = torch.randint(1, 50, (2, PROMPT + NEW), generator=torch.Generator().manual_seed(1))
    fast, fast_cache, taken = _decode(model, ids, lean=lean, monkeypatch=monkeypatch)
    slow, slow_cache, none = _decode(model, ids, lean=False, monkeypatch=monkeypatch)
    # positions past the prompt's first step and past W + S take the lean step, in each
    # layer; the fused one also those from S to W + S (before the ring is full)
    eligible = [t for t in range(PROMPT, PROMPT + NEW) if t > PROMPT and t > window + sinks]
    if lean is True:
        eligible += [t for t in range(PROMPT, PROMPT + NEW) if max(sinks, 1) <= t <= window + sinks]
    assert none == 0 and taken == len(eligible) * len(model.model.layers)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)
    for a, b in zip(_state(slow_cache), _state(fast_cache), strict=True):
        # relative to the tensor's scale, as in float32 below: an entry of kv that cancels
        # keeps round-off of the size of its terms (the compiled step's exp2 and sums differ
        # from the general step's by an ulp)
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10 * max(float(a.abs().max()), 1.0))
    with torch.no_grad():
        torch.testing.assert_close(fast, model(input_ids=ids).logits, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("calibrated", [False, "drifted", "distilled", "tied"], ids=str)
def test_lean_decoding_in_float32_agrees_with_the_general_step(tiny_llama, monkeypatch, calibrated):
    model = _model(tiny_llama, window=3, sinks=1, calibrated=calibrated, dtype=torch.float32)
    ids = torch.randint(1, 50, (1, PROMPT + NEW), generator=torch.Generator().manual_seed(2))
    fast, fast_cache, taken = _decode(model, ids, lean=True, monkeypatch=monkeypatch)
    slow, slow_cache, _ = _decode(model, ids, lean=False, monkeypatch=monkeypatch)
    assert taken > 0
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    for a, b in zip(_state(slow_cache), _state(fast_cache), strict=True):
        # the fused step sums the far state in another order: an entry of kv that cancels
        # (values of both signs) keeps round-off of the size of its terms, so the absolute
        # tolerance follows the tensor's scale (kv, z ~ 1e10 with the features' headroom)
        scale = float(a.abs().max()) if a.is_floating_point() else 0.0
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * max(scale, 1.0))


def test_padding_and_blocks_take_the_general_step(tiny_llama, monkeypatch):
    ids = torch.randint(1, 50, (2, PROMPT + NEW), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding: the state's slots may hold padding
    model = _model(tiny_llama, window=2, sinks=1)
    padded, cache, taken = _decode(model, ids, mask, lean=True, monkeypatch=monkeypatch)
    assert taken == 0 and all(layer.padded for layer in cache.layers)
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    # the cache's positions count from 0 for every row: compare the unpadded row
    torch.testing.assert_close(padded[0], want[0], rtol=1e-9, atol=1e-9)
    blocks = _model(tiny_llama, window=2, sinks=1, block=3)
    out, _, taken = _decode(blocks, ids, lean=True, monkeypatch=monkeypatch)
    assert taken == 0
    with torch.no_grad():
        torch.testing.assert_close(out, blocks(input_ids=ids).logits, rtol=1e-9, atol=1e-9)


def test_a_reset_cache_forgets_what_the_lean_step_relies_on(tiny_llama, monkeypatch):
    model = _model(tiny_llama, window=2, sinks=1)
    ids = torch.randint(1, 50, (1, PROMPT + NEW), generator=torch.Generator().manual_seed(4))
    _, cache, _ = _decode(model, ids, lean=True, monkeypatch=monkeypatch)
    layer = cache.layers[0]
    layer.padded = True
    cache.reset()
    assert (layer.state, layer.terms, layer.padded, layer.built) == (None, None, False, 0)


@pytest.mark.parametrize("calibrated", [False, "drifted", "distilled", "tied"], ids=str)
@pytest.mark.parametrize("fold", [2, 3, 8], ids=lambda p: f"fold{p}")
# W = 12, 16: the reads fall before the ring is full (W = 12: the 3-token call, W = 16: all)
@pytest.mark.parametrize("window", [2, 12, 16], ids=lambda w: f"W{w}")
def test_the_fused_layout_converts_back_for_any_other_use_and_is_entered_again(
    tiny_llama, monkeypatch, calibrated, fold, window
):
    """Fused steps, then a call of several tokens (the general path reads the state: it is
    converted back to an ExactState, pending keys folded), then fused steps again (entered
    anew), a size query and a beam reorder in between: the teacher-forced logits throughout,
    with pending keys folded every ``fold`` tokens (the reads fall before, at and after folds)."""
    monkeypatch.setattr(fused, "FOLD_EVERY", fold)
    model = _model(tiny_llama, window=window, sinks=1, calibrated=calibrated)
    ids = torch.randint(1, 50, (2, 20), generator=torch.Generator().manual_seed(6))
    cache, out = fh.FavorCache(model), []
    spans = [(0, 5)] + [(i, i + 1) for i in range(5, 10)] + [(10, 13)] + [(i, i + 1) for i in range(13, 20)]
    with torch.no_grad():
        for lo, hi in spans:
            out.append(model(input_ids=ids[:, lo:hi], cache=cache, use_cache=True).logits)
            if hi == 9:
                assert all(layer.lean is not None for layer in cache.layers)  # the fused layout is in use
                # identity maps or a tied key side: the far state once per key/value head
                # (LeanConstants.shared)
                assert all(layer.lean.shared == (calibrated in (False, "tied")) for layer in cache.layers)
                assert cache.nbytes > 0 and all(layer.lean is not None for layer in cache.layers)
            if hi == 16:
                cache.reorder_cache(torch.tensor([0, 1]))  # beam search's reorder: back to ExactState
                assert all(layer.lean is None for layer in cache.layers)
        assert all(layer.lean is not None for layer in cache.layers)
        torch.testing.assert_close(torch.cat(out, 1), model(input_ids=ids).logits, rtol=1e-9, atol=1e-9)


def test_fused_constants_are_kept_until_a_buffer_changes(tiny_llama):
    # decoding asks for them per layer and token: the same object while the buffers stand,
    # new ones (with the new far gain in cq) once a buffer is written in place
    model = _model(tiny_llama, window=3, sinks=1, calibrated=True)
    adapter = next(m for m in model.modules() if isinstance(m, fh.FavorAdapter))
    first = adapter.lean_constants(None, torch.float64, "cpu")
    assert first is not None and adapter.lean_constants(None, torch.float64, "cpu") is first
    adapter.far_log_gain.fill_(-1.0)
    second = adapter.lean_constants(None, torch.float64, "cpu")
    assert second is not first
    torch.testing.assert_close(second.cq, first.cq + 1.4426950408889634, rtol=0, atol=1e-12)  # log_const - g, in log2


def test_single_tokens_take_the_short_path_and_leave_it_when_anything_changes(tiny_llama, monkeypatch):
    """decode._fused_token (the fused layout's next token without _exact's checks) runs for
    the steady state's tokens and gives way to the full path for a token under grad mode and
    after the exact terms change: teacher-forced logits throughout."""
    model = _model(tiny_llama, window=2, sinks=1)
    ids = torch.randint(1, 50, (2, 16), generator=torch.Generator().manual_seed(7))
    results = []
    real = decode._fused_token

    def spy(*args):
        results.append(real(*args))
        return results[-1]

    monkeypatch.setattr(decode, "_fused_token", spy)
    cache, out = fh.FavorCache(model), []
    with torch.no_grad():
        out.append(model(input_ids=ids[:, :5], cache=cache, use_cache=True).logits)
        for t in range(5, 12):
            out.append(model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    assert sum(r is not None for r in results) > 0 and all(layer.fast is not None for layer in cache.layers)
    assert all(r.is_contiguous() for r in results if r is not None)  # (B, 1, H, Dv) as the general path's
    results.clear()
    with torch.enable_grad():  # the general step (it keeps the graph): the short path declines
        out.append(model(input_ids=ids[:, 12:13], cache=cache, use_cache=True).logits.detach())
    assert results and all(r is None for r in results)
    with torch.no_grad():
        torch.testing.assert_close(torch.cat(out, 1), model(input_ids=ids[:, :13]).logits, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("window", [2, 12], ids=lambda w: f"W{w}")
def test_a_beam_reorder_of_the_fused_layout_swaps_the_rows_histories(tiny_llama, monkeypatch, window):
    """reorder_cache([1, 0]) in the fused layout (W = 12: before the ring is full, W = 2: the
    steady state): the next tokens' logits are the teacher-forced ones of the swapped rows."""
    monkeypatch.setattr(fused, "FOLD_EVERY", 3)
    model = _model(tiny_llama, window=window, sinks=1, calibrated="distilled")
    ids = torch.randint(1, 50, (2, 20), generator=torch.Generator().manual_seed(8))
    swapped = ids[[1, 0]]
    cache, out = fh.FavorCache(model), []
    with torch.no_grad():
        model(input_ids=ids[:, :5], cache=cache, use_cache=True)
        for t in range(5, 9):
            model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True)
        assert all(layer.lean is not None for layer in cache.layers)
        cache.reorder_cache(torch.tensor([1, 0]))
        for t in range(9, 20):
            out.append(model(input_ids=swapped[:, t : t + 1], cache=cache, use_cache=True).logits)
        assert all(layer.lean is not None for layer in cache.layers)  # entered again
        torch.testing.assert_close(torch.cat(out, 1), model(input_ids=swapped).logits[:, 9:], rtol=1e-9, atol=1e-9)
