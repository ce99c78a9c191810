"""Train a byte-level Performer language model on your own text file, then sample from it.

    python examples/train_text_lm.py --text my_corpus.txt --out runs/text --steps 2000
    python examples/train_text_lm.py --text my_corpus.txt --out runs/text --steps 4000 --resume

Bytes are the tokens (vocabulary 256: any language, no tokenizer to train). Windows of
--seq-len bytes are drawn at random from the file (seeded by step, so a resumed run sees
the batches an uninterrupted one would); the last 5 % of the file is held out. Checkpoints
are favor's format (safetensors + JSON, atomic); the last one is reloaded to sample.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from favor.models import PerformerConfig, PerformerLM
from favor.training import load_checkpoint, load_model_state, save_checkpoint
from favor.training.checkpoint import optimizer_from_tensors


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--text", required=True, help="a UTF-8 (or any byte) text file")
    p.add_argument("--out", required=True, help="run directory (checkpoints/, sample.txt)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512, help="context length in bytes")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kernel", default="positive", help="favor.KERNELS name (positive = FAVOR+)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--sample-bytes", type=int, default=300)
    p.add_argument("--prompt", default="The ")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    return p.parse_args(argv)


def batch(data: torch.Tensor, step: int, batch_size: int, seq_len: int, seed: int):
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=g)
    x = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()])
    return x[:, :-1], x[:, 1:]


@torch.no_grad()
def bits_per_byte(model: PerformerLM, data: torch.Tensor, seq_len: int, windows: int = 8) -> float:
    model.eval()
    n = min(windows, (len(data) - 1) // seq_len)
    x = data[: n * seq_len + 1]
    inp, tgt = x[:-1].view(n, seq_len), x[1:].view(n, seq_len)
    loss = F.cross_entropy(model(inp).flatten(0, 1), tgt.flatten())
    model.train()
    return float(loss) / math.log(2)


def main(argv=None) -> dict:
    args = parse_args(argv)
    data = torch.frombuffer(bytearray(Path(args.text).read_bytes()), dtype=torch.uint8).long()
    if len(data) < 4 * (args.seq_len + 1):
        raise SystemExit(f"{args.text}: {len(data)} bytes; need at least 4 windows of --seq-len {args.seq_len}")
    cut = int(0.95 * len(data))
    train_data, val_data = data[:cut], data[cut:]
    if len(val_data) < args.seq_len + 1:
        val_data = data[-(args.seq_len + 1) :]
    cfg = PerformerConfig(
        vocab_size=256,
        dim=args.dim,
        depth=args.depth,
        heads=args.heads,
        kernel=args.kernel,
        max_len=args.seq_len,
        seed=args.seed,
    )
    model = PerformerLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    config = {"model": cfg.to_dict(), "example": vars(args)}
    start = 0
    if args.resume:
        ckpt = load_checkpoint(args.out)
        load_model_state(model, ckpt)
        opt.load_state_dict(optimizer_from_tensors(ckpt.optimizer_tensors(), ckpt.trainer["optimizer"]))
        start = ckpt.step
    history = []
    for step in range(start + 1, args.steps + 1):
        x, y = batch(train_data, step, args.batch_size, args.seq_len, args.seed)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            val = bits_per_byte(model, val_data, args.seq_len)
            history.append(
                {"step": step, "train_bits_per_byte": float(loss.detach()) / math.log(2), "val_bits_per_byte": val}
            )
            print(f"step {step:6d}  train {history[-1]['train_bits_per_byte']:.3f}  val {val:.3f} bits/byte")
        if step % args.checkpoint_every == 0 or step == args.steps:
            save_checkpoint(args.out, step=step, model=model, config=config, optimizer=opt)
    model.eval()
    prompt = torch.tensor([list(args.prompt.encode())])
    out = model.generate(prompt, args.sample_bytes, top_k=20, generator=torch.Generator().manual_seed(args.seed))
    text = bytes(out[0].tolist()).decode("utf-8", errors="replace")
    (Path(args.out) / "sample.txt").write_text(text, encoding="utf-8")
    print(f"\nsample:\n{text}")
    return {"history": history, "sample": text}


if __name__ == "__main__":
    main()
