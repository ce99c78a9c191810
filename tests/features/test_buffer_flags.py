"""buffer_derived (favor.features.buffer_flags): a value of buffers cached per version."""

from __future__ import annotations

import torch

from favor.features.buffer_flags import buffer_derived


class _Owner:
    pass


def _counting():
    calls = []

    def compute():
        calls.append(1)
        return len(calls)

    return calls, compute


def test_a_derived_value_is_kept_until_a_buffer_changes_and_remade_for_a_gradient():
    owner, buf = _Owner(), torch.zeros(3)
    calls, compute = _counting()
    assert buffer_derived(owner, "x", (buf,), compute) == 1
    assert buffer_derived(owner, "x", (buf,), compute) == 1  # kept
    buf.add_(1.0)  # a new version
    assert buffer_derived(owner, "x", (buf,), compute) == 2
    buf.requires_grad_(True)  # a gradient needs the graph: made every call
    assert buffer_derived(owner, "x", (buf,), compute) == 3
    assert buffer_derived(owner, "x", (buf,), compute) == 4
    with torch.inference_mode():  # an inference tensor could not enter autograd later
        assert buffer_derived(owner, "y", (torch.zeros(2),), compute) == 5
        assert buffer_derived(owner, "y", (torch.zeros(2),), compute) == 6


def test_graph_free_callers_keep_the_value_of_buffers_that_require_grad():
    """graph_free: the caller checked grad and inference mode off, so requires_grad is not
    asked and the value is kept per version; a caller with grad mode on still remakes it."""
    owner, buf = _Owner(), torch.zeros(3, requires_grad=True)
    calls, compute = _counting()
    with torch.no_grad():
        assert buffer_derived(owner, "x", (buf,), compute, graph_free=True) == 1
        assert buffer_derived(owner, "x", (buf,), compute, graph_free=True) == 1
        buf.add_(1.0)
        assert buffer_derived(owner, "x", (buf,), compute, graph_free=True) == 2
    assert buffer_derived(owner, "x", (buf,), compute) == 3  # grad mode: made again, not the kept one
    with torch.no_grad():
        assert buffer_derived(owner, "x", (buf,), compute, graph_free=True) == 2
