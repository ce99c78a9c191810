"""Run a worker function in W spawned CPU processes joined by a gloo process group.

Each worker gets (rank, world, out_dir, *args) after the group is up, and returns a
picklable result; ``run`` returns the results by rank. Processes use one thread each:
the test machine has few cores and W of them share it.
"""

from __future__ import annotations

import gc
import os
import pickle
import sys
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT = timedelta(seconds=60)


def _entry(rank: int, world: int, init_file: str, out_dir: str, fn, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=TIMEOUT)
    try:
        result = fn(rank, world, out_dir, *args)
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
        # no rank tears its group down while the other may still be talking to it
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # CI once saw a rank abort at exit ("terminate called without an active exception",
    # SIGABRT) after its result was written: gloo's threads, still owned by a DDP/FSDP
    # object, were destroyed during interpreter finalisation. The result is on disk, so
    # skip finalisation: drop the objects while Python is alive, flush, leave with 0.
    gc.collect()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run(fn, world: int, *args):
    """fn(rank, world, out_dir, *args) on ``world`` gloo processes -> [result of rank 0, ...]."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "store")
        mp.spawn(_entry, args=(world, init_file, tmp, fn, args), nprocs=world, join=True)
        results = []
        for r in range(world):
            with open(os.path.join(tmp, f"rank{r}.pkl"), "rb") as f:
                results.append(pickle.load(f))
    return results
