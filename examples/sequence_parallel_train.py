"""Train a Performer LM with every sequence split across processes (sequence parallelism).

    torchrun --nproc-per-node 4 examples/sequence_parallel_train.py --text corpus.txt --seq-len 65536
    python examples/sequence_parallel_train.py --text corpus.txt      # one process, same results

Each of the W processes holds a contiguous slice of L/W positions of every sequence; its
activation memory falls with W. Causal FAVOR needs from the positions before a slice only
their summed state, an M x Dv matrix per head whatever L, so each layer exchanges that
state once (one all-gather forward, one reduce-scatter backward). The gradients of the
parameters are then summed across the processes. The result equals one process training
on whole sequences (to float round-off): the losses printed here are the same whether
run under torchrun or not.

Multi-node on GPUs: ``torchrun --nnodes N --nproc-per-node G --rdzv-backend c10d
--rdzv-endpoint HOST:PORT examples/sequence_parallel_train.py ...`` (NCCL is picked when
CUDA is available, one GPU per process from LOCAL_RANK).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from favor.distributed import sequence_parallel_forward, shard_sequence
from favor.distributed.train import all_reduce_gradients, init_from_env, leave_process_group
from favor.models import PerformerConfig, PerformerLM


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--text", help="a text file (bytes are tokens); default: random bytes")
    p.add_argument("--seq-len", type=int, default=16384)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="float64 for exactness checks")
    return p.parse_args(argv)


def batch(data: torch.Tensor, step: int, batch_size: int, seq_len: int, seed: int):
    """The same batch on every rank: seeded by (seed, step), not by rank."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=g)
    x = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()])
    return x[:, :-1], x[:, 1:]


def main(argv=None) -> list[float]:
    args = parse_args(argv)
    distributed = "RANK" in os.environ  # launched by torchrun
    rank, world = init_from_env() if distributed else (0, 1)
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.is_initialized() and dist.get_backend() == "nccl"
        else "cpu"
    )
    dtype = getattr(torch, args.dtype)
    if args.text:
        data = torch.frombuffer(bytearray(Path(args.text).read_bytes()), dtype=torch.uint8).long()
    else:
        data = torch.randint(0, 256, (4 * args.seq_len,), generator=torch.Generator().manual_seed(args.seed))
    cfg = PerformerConfig(
        vocab_size=256, dim=args.dim, depth=args.depth, heads=args.heads, max_len=args.seq_len, seed=args.seed
    )
    model = PerformerLM(cfg).to(device=device, dtype=dtype)  # same seed: same initial weights on every rank
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    tokens_per_step = args.batch_size * args.seq_len
    losses = []
    for step in range(1, args.steps + 1):
        x, y = batch(data, step, args.batch_size, args.seq_len, args.seed)
        x, offset = shard_sequence(x.to(device))  # this rank's slice (B, L/W) and where it starts
        y, _ = shard_sequence(y.to(device))
        logits = sequence_parallel_forward(model, x, offset=offset)
        # sum over this rank's tokens / all tokens: the ranks' losses add up to the global mean
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") / tokens_per_step
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            all_reduce_gradients(model)
        opt.step()
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total)
        losses.append(float(total))
        if rank == 0:
            print(f"step {step:4d}  loss {losses[-1]:.10f}  ({world} process{'es' if world > 1 else ''})")
    if distributed:
        # barrier, destroy, and let gloo's threads free their last collectives before the
        # interpreter exits (see its docstring: else a rank can abort at exit)
        leave_process_group()
    return losses


if __name__ == "__main__":
    main()
