"""Does pure FAVOR+ ever leave the books plateau? One long run, then its attention's entropy.

``favor paper books``' full setting (KJV + Jane Austen, masked LM on bytes, L = 2,048 after
the 128 -> 2,048 length warm-up, dim 128, 4 heads of 32, M = D ln D = 111 orthogonal
features redrawn every step, lr 3e-3) for FAVOR+ alone, seed 0, ``--steps`` steps (the
warm-up spans the first ``--warmup-steps``), scored every ``--eval-every`` steps on books'
16 held-out windows. Then, on one held-out window, per layer and head: the entropy (nats;
uniform = ln L) of the attention FAVOR's features give (the row-normalised phi(q) phi(k)^T),
of the exact softmax of the same q and k (what the learned projections would attend to
without the approximation), and the std of those logits q.k/sqrt(D). A peaked softmax with
a flat FAVOR row is the approximation failing; both flat means the model never learned to
look at neighbours.

    python -m benchmarks.books_favor_long [--steps 2000] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from ._common import header
from .books_plateau import per_layer


def attention_entropy(model, task) -> list[dict]:
    """Per layer: FAVOR's and softmax's row entropy (mean over rows), per head, and the logit std."""
    from favor.ops.reference import kernel_matrix

    def ent(p):
        return (-(p * p.clamp_min(1e-30).log()).sum(-1)).mean((0, 2)).tolist()

    def measure(mod, q, k, logits):
        fav = kernel_matrix(q.double(), k.double(), mod.feature_map.double())
        mod.feature_map.float()
        return {
            "favor_entropy": ent(fav),
            "softmax_entropy_same_qk": ent(logits.softmax(-1)),
            "softmax_max_weight_same_qk": logits.softmax(-1).max(-1).values.mean((0, 2)).tolist(),
            "logit_std": logits.std((0, 2, 3)).tolist(),
        }

    return per_layer(model, task, measure, rows=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.books_favor_long", description=__doc__)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--warmup-steps", type=int, default=200, help="steps of the 128 -> 2,048 length warm-up")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/paper/plateau")
    args = parser.parse_args(argv)
    import torch

    from favor.paper.books import CURRICULUM, LR, MODES, WARMUP, corpus, length_schedule, make_task
    from favor.paper.harness import Variant, train_run

    torch.set_num_threads(1)
    size, seq_len, batch, _, _, eval_rows, _ = MODES["full"]
    start, _ = CURRICULUM["full"]
    info = header(f"books, pure FAVOR+ for {args.steps} steps (seed {args.seed})")
    train, val, note = corpus(quick=False, data_dir=str(Path.home() / ".cache" / "favor" / "paper"))
    task = make_task(
        train,
        val,
        seq_len=seq_len,
        batch=batch,
        eval_rows=eval_rows,
        length_at=lambda s: length_schedule(s, steps=args.warmup_steps, start=start, full=seq_len, fraction=1.0),
    )
    t0 = time.perf_counter()
    run = train_run(
        task,
        Variant("FAVOR+ redraw", kernel="positive"),
        size,
        seed=args.seed,
        steps=args.steps,
        eval_every=args.eval_every,
        lr=LR,
        warmup=WARMUP,
        redraw_interval=1,
    )
    wall = time.perf_counter() - t0
    model = run.pop("model").eval()
    out = {
        "machine": info,
        "corpus": note,
        "unigram": task.unigram(),
        "config": {"steps": args.steps, "warmup_steps": args.warmup_steps, "seed": args.seed, "L": seq_len,
                   "dim": size.dim, "heads": size.heads, "depth": size.depth, "lr": LR, "redraw_interval": 1},
        "curve": [(p["step"], p["accuracy"], p["loss"]) for p in run["curve"]],
        "wall_s": wall,
        "sec_per_step": run["sec_per_step"],
        "attention": attention_entropy(model, task),
        "ln_L": math.log(seq_len),
    }  # fmt: skip
    print("curve (step, accuracy, loss):", [(s, round(a, 4), round(l, 3)) for s, a, l in out["curve"]])
    for i, s in enumerate(out["attention"]):
        print(f"layer {i}:", {k: [round(x, 3) for x in v] for k, v in s.items()}, f"(ln L = {out['ln_L']:.2f})")
    print(f"{wall:.0f} s")
    path = Path(args.out)
    path.mkdir(parents=True, exist_ok=True)
    (path / "books-favor-long.json").write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
