"""exact_step_lean (the decoding step of favor.hf's FavorCache in the steady state) against
its reference, exact_step(..., inplace=True): the same outputs and the same state after
every token, across the ring's wrap-around (the window boundary), with and without sinks,
W = 0, a per-head log_const, after a prompt and from an empty state. The lean step does the
reference's arithmetic op for op, so float64 agrees to 1e-10 (in practice bit for bit) and
float32 to 1e-5."""

from __future__ import annotations

import pytest
import torch

import favor
from favor.ops.local.dispatch import exact_attention
from favor.ops.local.recurrent import ExactState, exact_step, exact_step_lean, lean_eligible
from favor.ops.step_features import step_features

B, H, D, L = 2, 3, 8, 40
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _inputs(dtype, kernel):
    g = torch.Generator().manual_seed(3)
    fm = favor.FeatureMap(kernel, dim=D, num_features=16, generator=torch.Generator().manual_seed(1)).to(dtype)
    q, k, v = (torch.randn(B, H, L, D, dtype=dtype, generator=g) for _ in range(3))
    return fm, q, k, v


def _fields(state: ExactState) -> list[torch.Tensor]:
    return [*state.far, *state[1:]]


def _run(terms, dtype, kernel, prompt, log_const):
    """Outputs and states of the reference steps and of the lean steps where eligible (the
    reference elsewhere), after a prompt of ``prompt`` tokens (0: from an empty state)."""
    fm, q, k, v = _inputs(dtype, kernel)
    root = D**-0.25
    states = []
    for _ in range(2):
        if prompt:
            p = (x[..., :prompt, :] for x in (q, k, v))
            states.append(exact_attention(*p, fm, terms, causal=True, root=root, return_state=True)[1])
        else:
            m = fm.num_features * (2 if kernel == "trig" else 1)
            states.append(ExactState.empty((B, H), terms, D, D, m, D, dtype=dtype, device="cpu"))
    ref, lean = states
    taken = 0
    for t in range(prompt, L):
        feat, a = step_features(fm, root, q[..., t : t + 1, :], k[..., t : t + 1, :])
        rows = [q[..., t, :], k[..., t, :], q[..., t, :] * root, k[..., t, :] * root, v[..., t, :]]
        o_ref, ref = exact_step(ref, terms, feat, a, *rows, log_const, None, inplace=True)
        if lean_eligible(terms, t, prompt):
            o_lean = exact_step_lean(lean, terms, feat, a, *(x.unsqueeze(-2) for x in rows), log_const, t=t)[..., 0, :]
            taken += 1
        else:
            o_lean, lean = exact_step(lean, terms, feat, a, *rows, log_const, None, inplace=True)
        torch.testing.assert_close(o_lean, o_ref, rtol=TOL[dtype], atol=TOL[dtype])
    return ref, lean, taken


@pytest.mark.parametrize(
    "terms",
    [
        favor.ExactTerms(4, 2, 1),  # the ring wraps around 5 times after the prompt
        favor.ExactTerms(0, 0, 1),  # the query alone: a ring of one slot
        favor.ExactTerms(0, 3, 1),  # sinks, no window
        favor.ExactTerms(7, 0, 1),  # a window, no sinks
    ],
    ids=str,
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("prompt", [0, 5, 12], ids=lambda p: f"prompt{p}")
def test_lean_steps_equal_the_reference_steps_and_leave_the_same_state(terms, dtype, prompt):
    ref, lean, taken = _run(terms, dtype, "positive", prompt, 0.0)
    assert taken >= L - max(prompt + 1, terms.window + terms.sinks + 1)  # the lean step did run
    for a, b in zip(_fields(ref), _fields(lean), strict=True):
        if a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=TOL[dtype], atol=TOL[dtype])
        else:
            assert torch.equal(a, b)


@pytest.mark.parametrize("kernel", ["oprf", "trig"])
def test_lean_steps_follow_the_reference_for_other_maps_and_a_per_head_log_const(kernel):
    log_const = torch.linspace(-0.5, 0.5, H, dtype=torch.float64)[:, None, None]
    terms = favor.ExactTerms(3, 1, 1)
    ref, lean, taken = _run(terms, torch.float64, kernel, 6, log_const)
    assert taken > 0
    for a, b in zip(_fields(ref), _fields(lean), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


def test_lean_eligible_takes_single_positions_past_the_sinks_and_the_first_step():
    w4 = favor.ExactTerms(4, 2, 1)
    assert not lean_eligible(w4, 6, 0)  # t <= W + S: the ring is not yet past the sinks
    assert lean_eligible(w4, 7, 0)
    assert not lean_eligible(w4, 20, 20)  # right after a prompt: the ring lacks position t - W - 1
    assert lean_eligible(w4, 21, 20)
    assert not lean_eligible(favor.ExactTerms(4, 2, 3), 100, 0)  # blocks: several keys leave at once
