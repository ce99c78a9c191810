"""Workers for the sequence-parallel tests (run in spawned processes, see _spawn.py).

Every rank builds the same full inputs from a seed, computes the single-process reference
(favor.attention on the whole sequence, outputs and gradients for a fixed random upstream
gradient), then runs sequence_parallel_attention on its own slice and reports the largest
deviations on that slice.
"""

from __future__ import annotations

from functools import partial

import torch

import favor
from favor.distributed import count_communication, sequence_parallel_attention, shard_bounds, state_bytes


def make_case(case: dict):
    g = torch.Generator().manual_seed(case.get("seed", 0))
    b, h, length, d, dv = case["B"], case["H"], case["L"], case["D"], case.get("Dv", case["D"])
    dtype, std = case.get("dtype", torch.float64), case.get("std", 1.0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype)

    q, k, v = rnd(b, h, length, d), rnd(b, h, length, d), rnd(b, h, length, dv)
    if case.get("key_shift"):  # late keys much larger than early ones: log scales differ by tens
        k = k + torch.linspace(0, case["key_shift"], length, dtype=torch.float64).to(dtype)[:, None]
    upstream = torch.randn(b, h, length, dv, generator=g, dtype=torch.float64).to(dtype)
    mask = None
    if case.get("mask"):
        mask = torch.rand(b, length, generator=g) < 0.3
        lo, hi = case.get("pad_span", (0, 0))
        mask[0, lo:hi] = True  # a whole slice of padding on some rank
    fm = (
        favor.FeatureMap(case["kernel"], dim=d, num_features=case.get("M"), generator=torch.Generator().manual_seed(7))
        if case["kernel"] != "elu"
        else favor.FeatureMap("elu", dim=d)
    )
    return q, k, v, upstream, mask, fm


def _grads(fn, q, k, v, upstream):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    (out.double() * upstream.double()).sum().backward()
    # a rank holding no tokens gets no gradient tensors: they are empty anyway
    return (out.detach(), *(t.grad if t.grad is not None else torch.zeros_like(t) for t in (q, k, v)))


def _err(a, b):
    if a.numel() == 0:
        return 0.0
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def sp_case_worker(rank: int, world: int, out_dir: str, cases: list[dict]) -> list[dict]:
    import torch.distributed as dist

    results = []
    for case in cases:
        group, g_rank, g_world = None, rank, world
        if case.get("split_groups"):
            # two sequence groups side by side (as on a data x sequence mesh), each with its
            # own sequence: every rank creates every group, then uses its own
            half = world // 2
            groups = [dist.new_group(list(range(0, half))), dist.new_group(list(range(half, world)))]
            group, g_rank, g_world = groups[rank // half], rank % half, half
            case = {**case, "seed": case.get("seed", 0) + rank // half}
        q, k, v, upstream, mask, fm = make_case(case)
        chunk = case.get("chunk")
        ref = _grads(
            partial(favor.attention, feature_map=fm, causal=True, key_padding_mask=mask, chunk_size=chunk),
            q,
            k,
            v,
            upstream,
        )
        bounds = case.get("bounds")
        start, stop = (bounds[g_rank], bounds[g_rank + 1]) if bounds else shard_bounds(case["L"], g_world, g_rank)
        sl = slice(start, stop)
        local_mask = None if mask is None else mask[:, sl]
        with count_communication() as counter:
            sp = partial(
                sequence_parallel_attention, feature_map=fm, group=group, key_padding_mask=local_mask, chunk_size=chunk
            )
            got = _grads(sp, q[..., sl, :], k[..., sl, :], v[..., sl, :], upstream[..., sl, :])
        errs = {name: _err(a, r[..., sl, :]) for name, a, r in zip(("out", "dq", "dk", "dv"), got, ref, strict=True)}
        errs["finite"] = all(bool(torch.isfinite(t).all()) for t in got)
        m_out = fm.num_outputs
        errs["payload"] = state_bytes(
            (case["B"], case["H"]),
            m_out,
            v.shape[-1],
            dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
        )
        errs["counted"] = (counter.forward_bytes, counter.forward_calls, counter.backward_bytes, counter.backward_calls)
        results.append(errs)
    return results
