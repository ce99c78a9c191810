"""Sizing ``favor paper books`` at long context: seconds per step of every variant, and
whether exact softmax leaves the unigram plateau (always predicting a space) in budget.

``time``: one training step of each variant of ``favor paper books`` (L, batch 1, one torch
thread; best of 3 after one warm-up step), and one evaluation pass of 8 rows.
``train``: one variant (default exact softmax) trained with the books task at L for
``--steps`` steps, with or without the sequence-length warm-up (``--warmup-lengths F``: the
context grows 128, 256, ... over the first fraction F of the steps, the same bytes per step;
evaluation always at L); masked accuracy every 50 steps.

    python -m benchmarks.books_long time [--dim 128 --heads 4] [--seq-len 2048]
    python -m benchmarks.books_long train [--warmup-lengths 0.5] [--seed 1] [--steps 400] [--no-austen]

Appends one JSON line per call to ``--out`` (default runs/bench/books_long.jsonl).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ._common import header


def _task(args, steps: int):
    from favor.paper.books import corpus, length_schedule, make_task

    train, val, note = corpus(quick=args.no_austen, data_dir=Path.home() / ".cache" / "favor" / "paper")
    lengths = None
    if args.warmup_lengths:
        frac, full = args.warmup_lengths, args.seq_len
        lengths = lambda s: length_schedule(s, steps=steps, start=128, full=full, fraction=frac)  # noqa: E731
    rows = max(1, 256 * 128 // args.seq_len)  # the books full mode's evaluation set
    return make_task(train, val, seq_len=args.seq_len, batch=1, eval_rows=rows, length_at=lengths), note


def time_variants(args) -> dict:
    import torch

    from favor.nn import FeatureRedrawer
    from favor.paper.books import VARIANTS
    from favor.paper.harness import ModelSize, build_model, unavailable

    task, note = _task(args, 10)
    size = ModelSize(dim=args.dim, depth=2, heads=args.heads, max_len=args.seq_len)
    out = {}
    for v in VARIANTS:
        if unavailable(v):
            continue
        model = build_model(v, size, vocab_size=task.vocab_size, causal=False, seed=0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        redrawer = FeatureRedrawer(model, 1 if v.redraw else 0, 0)
        times = []
        for step in range(1, 5):
            t0 = time.perf_counter()
            loss = task.loss(model, task.batch(step, 0))
            opt.zero_grad()
            loss.backward()
            opt.step()
            redrawer.step(step)
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        task.evaluate(model)
        out[v.name] = {"sec_per_step": min(times[1:]), "eval_sec": time.perf_counter() - t0}
        print(f"{v.name:18s} {out[v.name]['sec_per_step']:.3f} s/step, evaluation {out[v.name]['eval_sec']:.2f} s")
    print(f"all variants: {sum(r['sec_per_step'] for r in out.values()):.2f} s per step")
    return {"corpus": note, "variants": out}


def train_one(args) -> dict:
    from favor.paper.books import VARIANTS
    from favor.paper.harness import ModelSize, train_run

    task, note = _task(args, args.steps)
    variant = next(v for v in VARIANTS if v.name == args.variant)
    size = ModelSize(dim=args.dim, depth=2, heads=args.heads, max_len=args.seq_len)
    t0 = time.perf_counter()
    r = train_run(task, variant, size, seed=args.seed, steps=args.steps, eval_every=50, lr=args.lr, warmup=10)
    curve = [(p["step"], round(p["accuracy"], 4), round(p["loss"], 4)) for p in r["curve"]]
    print(f"unigram {task.unigram()['accuracy']:.3f}; {time.perf_counter() - t0:.0f} s; accuracy by step:")
    print(" ".join(f"{s}:{a:.3f}" for s, a, _ in curve))
    return {"corpus": note, "curve": curve, "sec_per_step": r["sec_per_step"], "unigram": task.unigram()}


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["time", "train"])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variant", default="softmax (exact)")
    p.add_argument("--warmup-lengths", type=float, default=0.0)
    p.add_argument("--no-austen", action="store_true", help="King James Bible only")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/bench/books_long.jsonl")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = header()
    res = time_variants(args) if args.what == "time" else train_one(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps({"args": vars(args), "machine": info, **res}, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
