"""favor.attention continuing a state over one or a few queries takes the recurrent path
(recurrent.steps): equal to the chunked causal pass over the whole sequence (float64, 1e-10),
outputs, state and gradients, with padded keys, for every kernel."""

import pytest
import torch

import favor
from favor.features.feature_map import FeatureMap
from favor.ops import api
from favor.ops.recurrent import STEP_MAX_QUERIES


def _inputs(length: int, *, seed: int, requires_grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    b, h, d = 2, 3, 8
    q, k, v = (torch.randn(b, h, length, d, generator=g, dtype=torch.float64) for _ in range(3))
    pad = torch.zeros(b, length, dtype=torch.bool)
    pad[1, :4] = True  # left padding
    pad[0, length - 3] = True  # a padded key among the continued ones
    return [t.requires_grad_(requires_grad) for t in (q, k, v)], pad, g


@pytest.mark.parametrize("kernel", ["positive", "oprf", "trig", "relu", "elu"])
def test_continued_short_queries_equal_the_chunked_pass(kernel, monkeypatch):
    (q, k, v), pad, g = _inputs(30, seed=1)
    fm = FeatureMap(kernel, dim=8, num_features=None if kernel == "elu" else 16, generator=g).double()
    full = favor.attention(q, k, v, fm, causal=True, key_padding_mask=pad)
    out, state = favor.attention(
        q[..., :20, :], k[..., :20, :], v[..., :20, :], fm, causal=True, key_padding_mask=pad[:, :20], return_state=True
    )

    def no_chunked(*args, **kwargs):
        raise AssertionError("a continued pass of <= STEP_MAX_QUERIES queries must not take the chunked path")

    monkeypatch.setattr(api, "causal_fast", no_chunked)
    monkeypatch.setattr(api, "causal_chunked", no_chunked)
    outs, t = [out], 20
    for n in (1, STEP_MAX_QUERIES, 2, 1, 1, 1):
        o, state = favor.attention(
            q[..., t : t + n, :],
            k[..., t : t + n, :],
            v[..., t : t + n, :],
            fm,
            causal=True,
            key_padding_mask=pad[:, t : t + n],
            initial_state=state,
            return_state=True,
        )
        outs.append(o)
        t += n
    assert t == 30
    # the same sums, accumulated position by position instead of per chunk: float64 round-off
    torch.testing.assert_close(torch.cat(outs, -2), full, rtol=1e-10, atol=1e-10)
    monkeypatch.undo()
    _, chunked_state = favor.attention(q, k, v, fm, causal=True, key_padding_mask=pad, return_state=True)
    # states agree as the sums they represent: kv * exp(log_scale)
    ratio = torch.exp(state.log_scale - chunked_state.log_scale)  # (B, H)
    torch.testing.assert_close(state.kv * ratio[..., None, None], chunked_state.kv, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state.z * ratio[..., None], chunked_state.z, rtol=1e-10, atol=1e-12)


def test_step_path_gradients_equal_the_chunked_pass():
    (q, k, v), pad, g = _inputs(12, seed=2, requires_grad=True)
    fm = FeatureMap("oprf", dim=8, num_features=16, generator=g).double()
    w = torch.randn(2, 3, 3, 8, generator=g, dtype=torch.float64)
    _, state = favor.attention(q[..., :9, :], k[..., :9, :], v[..., :9, :], fm, causal=True, return_state=True)
    step = favor.attention(q[..., 9:, :], k[..., 9:, :], v[..., 9:, :], fm, causal=True, initial_state=state)
    full = favor.attention(q, k, v, fm, causal=True)[..., 9:, :]
    torch.testing.assert_close(step, full, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad((step * w).sum(), (q, k, v))
    ref = torch.autograd.grad((full * w).sum(), (q, k, v))
    for a, b in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_longer_continued_passes_keep_the_chunked_path(monkeypatch):
    (q, k, v), _, g = _inputs(STEP_MAX_QUERIES + 1, seed=3)
    fm = FeatureMap("positive", dim=8, num_features=16, generator=g).double()
    calls = []
    real = api.causal_fast
    monkeypatch.setattr(api, "causal_fast", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    favor.attention(q, k, v, fm, causal=True, return_state=True)
    assert calls


def test_state_gradients_equal_the_chunked_pass_regression():
    """Regression (found by the property tests at the merge of the step path): the step path
    let the running max of the log scales carry gradient, so d state.kv / d k differed from
    the chunked pass's, whose max is a constant (it cancels in the outputs, not in kv)."""
    (q, k, v), _, g = _inputs(5, seed=4, requires_grad=True)
    fm = FeatureMap("positive", dim=8, num_features=4, projection="iid", generator=g).double()
    _, final = favor.attention(q, k, v, fm, causal=True, return_state=True)
    _, state = favor.attention(q[..., :1, :], k[..., :1, :], v[..., :1, :], fm, causal=True, return_state=True)
    _, state = favor.attention(
        q[..., 1:, :], k[..., 1:, :], v[..., 1:, :], fm, causal=True, initial_state=state, return_state=True
    )
    torch.testing.assert_close(state.log_scale, final.log_scale, rtol=0, atol=1e-12)
    g_steps = torch.autograd.grad(state.kv.sum() + state.z.sum(), (k, v))
    g_whole = torch.autograd.grad(final.kv.sum() + final.z.sum(), (k, v))
    for a, b in zip(g_steps, g_whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
