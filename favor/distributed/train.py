"""Distributed training of a PerformerLM: ``favor train --sequence-parallel N`` and
``favor train --data-parallel N`` (under torchrun).

The loop is ``favor.training.train`` (one loop for every run) with a ``RankSplit``, which
splits each sequence across the N ranks of a group: every rank draws the same batch (seeded by (seed, step), no communication), keeps its
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

from ..models import PerformerConfig
from ..training.loop import Split, TrainConfig, train
from .collectives import group_rank_size
from .modules import sequence_parallel_forward
from .sharding import shard_bounds

__all__ = [
    "train_sequence_parallel",
    "train_data_parallel",
    "train_distributed",
    "RankSplit",
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


class RankSplit(Split):
    """``favor.training.train``'s split across the ranks of ``group``: each rank keeps its
    contiguous slice of the step's batch (positions for ``split="sequence"``, run with the
    attention layers sequence-parallel; rows for ``split="batch"``, the ordinary forward),
    takes as loss its slice's summed cross-entropy over the global token count, and the
    gradients and losses are summed over the ranks. Rank 0 evaluates and writes; every
    checkpoint keeps every rank's torch RNG state."""

    def __init__(
        self,
        split: str,
        *,
        group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        batch_size: int,
        seq_len: int,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.split, self.group = split, group
        self.rank, self.world = group_rank_size(group)
        if device is None:
            nccl = self.world > 1 and str(dist.get_backend(group)).lower() == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self.device = torch.device(device)
        self.writes = self.rank == 0
        # every rank restores its own RNG state; a checkpoint of a single-process run has only "rng.torch"
        self.rng_key = f"rng.torch.rank{self.rank}"
        self.title = f"Performer LM, {_SUMMARY_KEY[split].replace('_', '-')} over {self.world} processes"
        self.lo, self.hi = shard_bounds(seq_len if split == "sequence" else batch_size, self.world, self.rank)
        self.total_tokens = batch_size * seq_len

    def tags(self) -> dict[str, Any]:
        return {_SUMMARY_KEY[self.split]: self.world}

    def loss(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        lo, hi = self.lo, self.hi
        if self.split == "sequence":
            x, y = x[:, lo:hi].to(self.device), y[:, lo:hi].to(self.device)
            logits = sequence_parallel_forward(model, x, offset=lo, group=self.group)
        else:
            x, y = x[lo:hi].to(self.device), y[lo:hi].to(self.device)
            logits = model(x)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") / self.total_tokens

    def reduce_gradients(self, model: torch.nn.Module) -> None:
        all_reduce_gradients(model, group=self.group)

    def global_loss(self, loss: torch.Tensor) -> float:
        total = loss.detach().clone()
        dist.all_reduce(total, group=self.group)
        return float(total)

    def rng_tensors(self) -> dict[str, torch.Tensor]:
        return _rng_states(self.group, self.world)


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
    ``split`` ("sequence": positions, "batch": rows): ``favor.training.train`` with a
    ``RankSplit``. Writes, on rank 0, DIR/log.jsonl, DIR/checkpoints/ and DIR/loss.png.
    ``resume`` continues from DIR's LATEST checkpoint.
    Returns the summary dict of ``favor.training.train`` (``loss`` is the global mean loss of
    the last step). ``device`` defaults to this rank's GPU under NCCL, else the CPU.
    ``throttle`` sleeps that long per step (tests use it to kill a rank mid-run)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    _, world = group_rank_size(group)
    if split == "sequence":
        if model_cfg.attention != "favor":
            raise ValueError(f"sequence parallelism needs attention='favor', got {model_cfg.attention!r}")
        if train_cfg.seq_len < world:
            raise ValueError(f"seq_len={train_cfg.seq_len} is shorter than the {world} ranks it is split across")
    elif train_cfg.batch_size < world:
        raise ValueError(f"batch_size={train_cfg.batch_size} is smaller than the {world} ranks it is split across")
    if train_cfg.objective != "causal":
        raise ValueError(f"distributed training trains causal LMs, got objective={train_cfg.objective!r}")
    strategy = RankSplit(split, group=group, device=device, batch_size=train_cfg.batch_size, seq_len=train_cfg.seq_len)
    return train(
        out_dir, model_cfg, train_cfg, resume=resume, on_step=on_step, throttle=throttle, write_plot=write_plot,
        split=strategy,
    )  # fmt: skip
