"""Distributed training of a PerformerLM: ``favor train --sequence-parallel N`` and
``favor train --data-parallel N`` (under torchrun).

The loop is ``favor.training.train`` with each sequence split across the N ranks of a group:
every rank draws the same batch (seeded by (seed, step), no communication), keeps its
contiguous slice of positions, runs the model with its attention layers sequence-parallel
(one all-gather of O(M' Dv) states per layer), and takes as loss its slice's summed
cross-entropy over the global token count, so the ranks' losses add up to the global mean.
Parameter gradients are then summed across ranks (one all-reduce per parameter), so every
rank applies the same update; redraws are seeded by (seed, layer, step). The parameters
after each step equal single-process training on the same batches up to float round-off
(tests/distributed/test_train_sequence_parallel.py).

Data parallelism is the same loop with the batch's rows split across the ranks instead of
its positions, and the ordinary (not sequence-parallel) forward.

Rank 0 writes the log, the checkpoints (the same format as ``favor train``, loadable by
``favor generate``, plus every rank's torch RNG state) and evaluates on the full validation
windows with the ordinary model. ``resume=True`` continues from the LATEST checkpoint
exactly (every rank reads it: the run directory must be visible to all ranks); the CLI
resumes by itself when torchrun restarts a failed job (``--max-restarts``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..models import PerformerConfig, PerformerLM
from ..nn import FeatureRedrawer, mix_seed
from ..training.checkpoint import save_checkpoint
from ..training.loop import (
    TrainConfig,
    _config_dict,
    _make_optimizer,
    evaluate_bits,
    finish_run,
    load_data,
    restore_run,
    run_summary,
    set_learning_rate,
    step_batch,
    truncate_log,
)
from .collectives import group_rank_size
from .modules import sequence_parallel_forward
from .sharding import shard_bounds

__all__ = [
    "train_sequence_parallel",
    "train_data_parallel",
    "train_distributed",
    "init_from_env",
    "leave_process_group",
    "all_reduce_gradients",
]

#: how a step's batch is split across ranks: its positions (dim 1) or its rows (dim 0)
SPLITS = ("sequence", "batch")
_SUMMARY_KEY = {"sequence": "sequence_parallel", "batch": "data_parallel"}

log = logging.getLogger(__name__)


def init_from_env(*, backend: str | None = None) -> tuple[int, int]:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT; LOCAL_RANK picks the GPU). Backend: nccl when CUDA is
    available, else gloo. Returns (rank, world size)."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"not launched by torchrun: environment lacks {missing} (use torchrun --nproc-per-node N)")
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        store = _elastic_store()
        if store is None:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(
                backend, store=store, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"])
            )
    return dist.get_rank(), dist.get_world_size()


#: seconds the caller waits, GIL released, after destroying the group (see leave_process_group)
GLOO_DRAIN_S = 0.1


def leave_process_group(*, synchronize: bool = True) -> None:
    """Tear down the default process group so the interpreter can exit cleanly.

    Why: gloo's worker threads free a finished collective's work object after the caller has
    moved on, and that object can hold the last reference to a tensor whose Python object
    already died, so freeing it takes the GIL. If it happens while the interpreter is
    finalizing, the thread is killed while taking the GIL and the process aborts
    ("terminate called without an active exception"; seen on a loaded 2-core machine in
    ~1 of 16 to 1 of 50 torchrun runs of examples/sequence_parallel_train.py, gdb backtrace:
    ~AsyncBarrierWork -> ~AsyncAllreduceWork -> TensorImpl::decref_pyobject -> take_gil ->
    pthread_exit during Py_FinalizeEx). The same race is discussed in pytorch/pytorch#179291.
    So: a barrier (every rank done with its collectives; skip it with ``synchronize=False``
    on an error path, where a peer may be gone), destroy the group, then wait with the GIL
    released for the workers to free what they hold. The wait narrows the window; it cannot
    close it, since torch offers no way to join gloo's workers."""
    if not dist.is_initialized():
        return
    if synchronize:
        dist.barrier()
    dist.destroy_process_group()
    time.sleep(GLOO_DRAIN_S)


def _elastic_store() -> dist.Store | None:
    """Under torchrun's agent store, a store whose keys are private to this restart attempt.

    torchrun keeps one store across restarts (TORCHELASTIC_USE_AGENT_STORE), so a restarted
    process can read a peer's address left by the failed attempt and wait forever to
    connect to it (seen with gloo: ProcessGroupGloo stuck in Pair::waitUntilConnected after
    a rank was killed). Prefixing every key with the attempt number avoids the stale keys.
    None outside torchrun's agent store (init_process_group's env:// default applies)."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or attempt is None:
        return None
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        int(os.environ["WORLD_SIZE"]),
        is_master=False,
        timeout=timedelta(minutes=10),
    )
    return dist.PrefixStore(f"favor/attempt_{attempt}/", store)


def all_reduce_gradients(model: torch.nn.Module, *, group: dist.ProcessGroup | None = None) -> None:
    """Sum every parameter's gradient over the group, flattened into one collective."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def _rng_states(group: dist.ProcessGroup | None, world: int) -> dict[str, torch.Tensor]:
    """Every rank's torch RNG state (a collective: all ranks call it at the same step)."""
    mine = torch.get_rng_state()
    states = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(states, mine, group=group)
    return {f"rng.torch.rank{r}": s for r, s in enumerate(states)}


def train_sequence_parallel(
    out_dir: str | Path, model_cfg: PerformerConfig, train_cfg: TrainConfig, **options
) -> dict[str, Any]:
    """Train a PerformerLM with every sequence split across the ranks of the group (every
    rank calls this with the same arguments): ``train_distributed(split="sequence")``,
    whose keyword options it takes."""
    return train_distributed(out_dir, model_cfg, train_cfg, split="sequence", **options)


def train_data_parallel(
    out_dir: str | Path, model_cfg: PerformerConfig, train_cfg: TrainConfig, **options
) -> dict[str, Any]:
    """Train a PerformerLM with every batch's rows split across the ranks of the group (every
    rank calls this with the same arguments): ``train_distributed(split="batch")``, whose
    keyword options it takes."""
    return train_distributed(out_dir, model_cfg, train_cfg, split="batch", **options)


def train_distributed(
    out_dir: str | Path,
    model_cfg: PerformerConfig,
    train_cfg: TrainConfig,
    *,
    split: str,
    group: dist.ProcessGroup | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    write_plot: bool = True,
    device: torch.device | str | None = None,
    resume: bool = False,
    throttle: float = 0.0,
) -> dict[str, Any]:
    """Train a PerformerLM with each step's batch split across the ranks of ``group`` by
    ``split`` ("sequence": positions, "batch": rows). Writes, on rank 0, DIR/log.jsonl,
    DIR/checkpoints/ and DIR/loss.png. ``resume`` continues from DIR's LATEST checkpoint.
    Returns the summary dict of ``favor.training.train`` (``loss`` is the global mean loss of
    the last step). ``device`` defaults to this rank's GPU under NCCL, else the CPU.
    ``throttle`` sleeps that long per step (tests use it to kill a rank mid-run)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rank, world = group_rank_size(group)
    if device is None:
        nccl = world > 1 and str(dist.get_backend(group)).lower() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    device = torch.device(device)
    if split == "sequence":
        if model_cfg.attention != "favor":
            raise ValueError(f"sequence parallelism needs attention='favor', got {model_cfg.attention!r}")
        if train_cfg.seq_len < world:
            raise ValueError(f"seq_len={train_cfg.seq_len} is shorter than the {world} ranks it is split across")
    elif train_cfg.batch_size < world:
        raise ValueError(f"batch_size={train_cfg.batch_size} is smaller than the {world} ranks it is split across")
    if train_cfg.objective != "causal":
        raise ValueError(f"distributed training trains causal LMs, got objective={train_cfg.objective!r}")
    out = Path(out_dir)
    log_path = out / "log.jsonl"
    lead = rank == 0
    config = _config_dict(model_cfg, train_cfg)
    model = PerformerLM(model_cfg).to(device)
    optimizer = _make_optimizer(model, train_cfg)
    start = 0
    if resume:
        # every rank restores its own RNG state; a checkpoint of a single-process run has only "rng.torch"
        start = restore_run(out, model, optimizer, config, rng_key=f"rng.torch.rank{rank}")
        if lead:
            truncate_log(log_path, start)
    else:
        if lead:
            out.mkdir(parents=True, exist_ok=True)
            if log_path.exists():
                log_path.unlink()
        torch.manual_seed(mix_seed(train_cfg.seed, 2))
    data = load_data(train_cfg)
    val_x = val_y = None
    if lead:
        val_x, val_y = (t.to(device) for t in data.heldout_windows(train_cfg.seq_len, train_cfg.eval_windows))
    redrawer = FeatureRedrawer(model, train_cfg.redraw_interval, model_cfg.seed)
    if split == "sequence":
        lo, hi = shard_bounds(train_cfg.seq_len, world, rank)
    else:
        lo, hi = shard_bounds(train_cfg.batch_size, world, rank)
    total_tokens = train_cfg.batch_size * train_cfg.seq_len
    model.train()
    t0 = time.perf_counter()
    last: dict[str, Any] = {}
    val_bpr = None
    step = start
    logf = open(log_path, "a", encoding="utf-8") if lead else None  # noqa: SIM115 (closed below)
    try:
        for step in range(start + 1, train_cfg.steps + 1):
            ts = time.perf_counter()
            lr = set_learning_rate(optimizer, step, train_cfg)
            x, y = step_batch(data, step, train_cfg)
            if split == "sequence":
                x, y = x[:, lo:hi].to(device), y[:, lo:hi].to(device)
                logits = sequence_parallel_forward(model, x, offset=lo, group=group)
            else:
                x, y = x[lo:hi].to(device), y[lo:hi].to(device)
                logits = model(x)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") / total_tokens
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            all_reduce_gradients(model, group=group)
            if train_cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
            optimizer.step()
            redrawer.step(step)
            global_loss = loss.detach().clone()
            dist.all_reduce(global_loss, group=group)
            elapsed = time.perf_counter() - t0
            row: dict[str, Any] = {
                "step": step,
                "loss": float(global_loss),
                "lr": lr,
                "tokens_per_s": total_tokens / max(1e-9, time.perf_counter() - ts),
                "time": elapsed,
                _SUMMARY_KEY[split]: world,
            }
            final = step == train_cfg.steps
            checkpoint = step % train_cfg.checkpoint_every == 0 or final
            rng = _rng_states(group, world) if checkpoint else None
            if lead:
                if step % train_cfg.eval_every == 0 or final:
                    val_bpr = evaluate_bits(model, val_x, val_y, counted=data.counted)
                    row["val_bpr"] = val_bpr
                if step % train_cfg.log_every == 0 or "val_bpr" in row or final:
                    logf.write(json.dumps(row) + "\n")
                    logf.flush()
                if checkpoint:
                    save_checkpoint(
                        out,
                        step=step,
                        model=model,
                        config=config,
                        optimizer=optimizer,
                        extra={"val_bpr": val_bpr, "data_format": data.format},
                        extra_tensors=rng,
                    )
            last = row
            if on_step is not None:
                on_step(row)
            if throttle:
                time.sleep(throttle)
    finally:
        if logf is not None:
            logf.close()
    wall = time.perf_counter() - t0
    return finish_run(
        out, log_path, model, write_plot=lead and write_plot, step=step, start=start, last=last, val_bpr=val_bpr,
        tokens=(step - start) * total_tokens, wall=wall, extra={_SUMMARY_KEY[split]: world},
        title=f"Performer LM, {_SUMMARY_KEY[split].replace('_', '-')} over {world} processes", unit=data.unit,
        summary=run_summary(model_cfg, train_cfg, unit=data.unit, stopped="steps", time_limit=None),
    )  # fmt: skip
