"""Single-process pieces of sequence parallelism.

- rank_state (chunked, hand-written backward) vs rank_state_reference (plain autograd):
  values and gradients at 1e-10 in float64.
- combine_states of the slices' local states equals the state favor.attention returns after
  the whole sequence (return_state=True): true sums kv * exp(log_scale) at 1e-10.
- Without a process group sequence_parallel_attention is favor.attention(causal=True).
"""

from __future__ import annotations

import pytest
import torch

import favor
from favor.distributed import (
    combine_states,
    rank_state,
    rank_state_reference,
    sequence_parallel_attention,
    shard_bounds,
)

KERNELS = ["positive", "trig", "hyperbolic", "oprf", "relu", "elu"]


def _fm(kernel, d=6, m=10):
    if kernel == "elu":
        return favor.FeatureMap("elu", dim=d)
    return favor.FeatureMap(kernel, dim=d, num_features=m, generator=torch.Generator().manual_seed(3))


def _inputs(gen, length=23, d=6, dv=5, std=1.0):
    k = (torch.randn(2, 3, length, d, generator=gen, dtype=torch.float64) * std).requires_grad_(True)
    v = torch.randn(2, 3, length, dv, generator=gen, dtype=torch.float64).requires_grad_(True)
    mask = torch.rand(2, 1, length, generator=gen) < 0.3
    return k, v, mask


def _true(state):
    e = torch.exp(state.log_scale)
    return state.kv * e[..., None, None], state.z * e[..., None]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("chunk", [1, 4, 50])
def test_rank_state_matches_reference(gen, kernel, chunk):
    fm = _fm(kernel)
    k, v, mask = _inputs(gen, std=0.6 if kernel == "trig" else 1.5)
    a = fm.oprf_a(k.detach(), k.detach(), causal=True) if kernel == "oprf" else None
    gkv, gz = (
        torch.randn(2, 3, fm.num_outputs, 5, generator=gen, dtype=torch.float64),
        torch.randn(2, 3, fm.num_outputs, generator=gen, dtype=torch.float64),
    )
    results = []
    for fn, kw in ((rank_state, {"chunk_size": chunk}), (rank_state_reference, {})):
        st = fn(k, v, fm.exact_features, a=a, key_padding_mask=mask, root=0.7, **kw)
        kv, z = _true(st)
        loss = (kv * gkv).sum() + (z * gz).sum()
        dk, dv = torch.autograd.grad(loss, [k, v])
        results.append((kv.detach(), z.detach(), dk, dv))
    for got, ref in zip(*results, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kernel", ["positive", "trig", "oprf", "elu"])
def test_combined_slices_equal_whole_sequence_state(gen, kernel):
    fm = _fm(kernel)
    length, world = 31, 3
    q = torch.randn(2, 3, length, 6, generator=gen, dtype=torch.float64)
    k, v, _ = _inputs(gen, length=length)
    k = k.detach() + torch.linspace(0, 3, length, dtype=torch.float64)[:, None]  # spread log scales
    _, whole = favor.attention(q, k, v.detach(), fm, causal=True, return_state=True)
    s = 6**-0.5
    ks = k * s**0.5
    a = fm.oprf_a(ks, ks, causal=True) if kernel == "oprf" else None
    parts = [
        rank_state(ks[..., lo:hi, :], v.detach()[..., lo:hi, :], fm.exact_features, a=a)
        for lo, hi in (shard_bounds(length, world, r) for r in range(world))
    ]
    stacked = [torch.stack(t) for t in zip(*parts, strict=True)]
    combined = combine_states(*stacked, keep=torch.tensor([True] * world))
    for got, ref in zip(_true(combined), _true(whole), strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    # keeping no row gives the empty state
    empty = combine_states(*stacked, keep=torch.tensor([False] * world))
    assert torch.equal(empty.kv, torch.zeros_like(empty.kv)) and bool(torch.isneginf(empty.log_scale).all())


def test_without_process_group_is_plain_causal_attention(gen):
    fm = _fm("positive")
    q, k, v = (torch.randn(2, 3, 17, 6, generator=gen, dtype=torch.float64) for _ in range(3))
    got = sequence_parallel_attention(q, k, v, fm, chunk_size=4)
    assert torch.equal(got, favor.attention(q, k, v, fm, causal=True, chunk_size=4))


def test_shard_bounds_cover_sequence():
    for length in (0, 1, 7, 64):
        for world in (1, 2, 3, 4):
            bounds = [shard_bounds(length, world, r) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == length
            assert all(b[1] == c[0] for b, c in zip(bounds[:-1], bounds[1:], strict=True))
            sizes = [hi - lo for lo, hi in bounds]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="rank"):
        shard_bounds(10, 2, 2)
