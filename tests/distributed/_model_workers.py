"""Workers for the model-level distributed tests (spawned, see _spawn.py).

Every rank builds the same PerformerLM from its config seed and the same global batches
from a seeded generator, so a single-process run on the global batch, computed in the
same worker, is the reference for the distributed one.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F

from favor.distributed import sequence_parallel_forward, shard_bounds
from favor.models import PerformerConfig, PerformerLM
from favor.nn import feature_maps, redraw_features

SEED = 11


def tiny_lm(**kw) -> PerformerLM:
    cfg = PerformerConfig(vocab_size=13, dim=16, depth=2, heads=2, num_features=8, max_len=64, seed=SEED, **kw)
    return PerformerLM(cfg).double()


def batches(steps: int, batch: int, length: int):
    g = torch.Generator().manual_seed(SEED)
    return [torch.randint(0, 13, (batch, length + 1), generator=g) for _ in range(steps)]


def _loss(model, tokens):
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def _train(model, data, *, redraw_every: int, step_fn):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    target = model.module if hasattr(model, "module") else model
    for step, tokens in enumerate(data, start=1):
        opt.zero_grad(set_to_none=True)
        step_fn(model, tokens).backward()
        opt.step()
        if step % redraw_every == 0:
            # seeded by (seed, layer, step): every rank draws the same matrices, no communication
            redraw_features(target, SEED, step)
    return model


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _max_rank_spread(tensors: dict[str, torch.Tensor]) -> float:
    """Largest difference of any entry between this rank and the others (0 if identical)."""
    worst = 0.0
    for t in tensors.values():
        gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, t.contiguous())
        worst = max(worst, max(float((g - t).abs().max()) if t.numel() else 0.0 for g in gathered))
    return worst


def _compare(got: dict, ref: dict) -> float:
    return max(float((got[k] - ref[k]).abs().max()) for k in ref if ref[k].numel())


def data_parallel_worker(rank: int, world: int, out_dir: str, kind: str, steps: int, batch: int, length: int) -> dict:
    data = batches(steps, batch, length)
    base = tiny_lm()
    reference = _train(copy.deepcopy(base), data, redraw_every=2, step_fn=_loss)
    ref_state = _snapshot(reference)
    lo, hi = shard_bounds(batch, world, rank)
    local_data = [t[lo:hi] for t in data]
    model = copy.deepcopy(base)
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model)
    else:
        # FSDP2 (per-parameter sharding over DTensor) runs on CPU with gloo; the older
        # FullyShardedDataParallel wrapper insists on an accelerator
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        wrapped = fully_shard(model)
    _train(wrapped, local_data, redraw_every=2, step_fn=_loss)
    if kind == "ddp":
        state = _snapshot(model)
    else:
        state = {
            k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()
        }
    projections = {f"fm{i}": fm.projection for i, fm in enumerate(feature_maps(model))}
    return {
        "keys_match": sorted(state) == sorted(ref_state),
        "vs_single": _compare(state, ref_state),
        "rank_spread": _max_rank_spread(state),
        "projection_spread": _max_rank_spread(projections),
        "projection_vs_single": _compare(
            projections, {f"fm{i}": fm.projection for i, fm in enumerate(feature_maps(reference))}
        ),
        "projection_changed": any(
            not torch.equal(fm.projection, fb.projection)
            for fm, fb in zip(feature_maps(model), feature_maps(base), strict=True)
        ),
    }


def sequence_parallel_model_worker(rank: int, world: int, out_dir: str, position: str, steps: int) -> dict:
    """Sequence-parallel training of a PerformerLM: every rank sees all rows of the batch
    but only its slice of positions; losses are local sums over the global token count and
    parameter gradients are summed across ranks."""
    length, batch = 24, 2
    data = batches(steps, batch, length)
    base = tiny_lm(position=position)
    reference = _train(copy.deepcopy(base), data, redraw_every=2, step_fn=_loss)
    # logits of the untrained model: the forward alone
    lo, hi = shard_bounds(length, world, rank)
    with torch.no_grad():
        full_logits = base(data[0][:, :-1])
        local_logits = sequence_parallel_forward(base, data[0][:, lo:hi], offset=lo)

    def sp_loss(model, tokens):
        x, y = tokens[:, :-1][:, lo:hi], tokens[:, 1:][:, lo:hi]
        logits = sequence_parallel_forward(model, x, offset=lo)
        return (
            F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") / y.new_tensor(batch * length).double()
        )

    model = copy.deepcopy(base)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    for step, tokens in enumerate(data, start=1):
        opt.zero_grad(set_to_none=True)
        sp_loss(model, tokens).backward()
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
        opt.step()
        if step % 2 == 0:
            redraw_features(model, SEED, step)
    state, ref_state = _snapshot(model), _snapshot(reference)
    return {
        "logits": float((local_logits - full_logits[:, lo:hi]).abs().max()),
        "vs_single": _compare(state, ref_state),
        "rank_spread": _max_rank_spread(state),
    }


def all_models_worker(rank: int, world: int, out_dir: str, train_overrides: dict) -> dict:
    """Every model-level check in one spawn (process start-up dominates on a small machine)."""
    from ._train_workers import train_worker

    return {
        "train": train_worker(rank, world, out_dir, train_overrides),
        "ddp": data_parallel_worker(rank, world, out_dir, "ddp", 4, 4, 12),
        "fsdp": data_parallel_worker(rank, world, out_dir, "fsdp", 4, 4, 12),
        "sp_rotary": sequence_parallel_model_worker(rank, world, out_dir, "rotary", 3),
        "sp_learned": sequence_parallel_model_worker(rank, world, out_dir, "learned", 3),
    }
