"""Why FAVOR stays at the unigram plateau of the byte-level masked LM (``favor paper books``).

Four measurements on the books task (King James Bible, L = 128, batch 16, lr 3e-3, warm-up 10,
dim 64, 2 layers, 2 heads of 32, rotary positions), one torch thread:

1. gradients: one float64 step of the FAVOR+ model through the fast bidirectional path and
   through the explicit L x L kernelised reference (favor.ops.reference), same features;
2. the exact softmax model after ``--steps`` steps: per layer and head, the entropy of its
   attention rows (nats; uniform = ln L), the std of its logits q.k/sqrt(D) and the mean norm
   of q and k after FAVOR's D^-1/4 scaling (positive features' variance grows like
   exp(|q + k|^2));
3. that trained softmax model with its weights loaded unchanged into FAVOR+ (M random
   features, three draws each): masked accuracy against M;
4. ``--sweep``: FAVOR+ and softmax trained from scratch with settings changed (more heads,
   more features, lower lr, learned positions, no redraw, ReLU), masked accuracy every 100 steps.

    python -m benchmarks.books_plateau [--steps 300] [--sweep] [--sweep-steps 300] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from ._common import header

L, BATCH, LR, WARMUP = 128, 16, 3e-3, 10
SWEEP = {
    "FAVOR+ (books setting)": ({}, {}, True),
    "softmax (books setting)": ({"attention": "softmax"}, {}, True),
    "FAVOR+ 8 heads of 8": ({"heads": 8}, {}, True),
    "FAVOR+ M = 512": ({"num_features": 512}, {}, True),
    "FAVOR+ lr 1e-3": ({}, {"lr": 1e-3}, True),
    "FAVOR+ learned positions": ({"position": "learned"}, {}, True),
    "softmax learned positions": ({"attention": "softmax", "position": "learned"}, {}, True),
    "FAVOR+ no redraw": ({}, {}, False),
    "ReLU": ({"kernel": "relu"}, {}, True),
    "softmax 8 heads of 8": ({"attention": "softmax", "heads": 8}, {}, True),
}


def _task():
    from favor.paper.books import corpus, make_task

    train, val, _ = corpus(quick=True, data_dir=None, austen=False)
    return make_task(train, val, seq_len=L, batch=BATCH, eval_rows=256)


def _model(task, **kw):
    from favor.models import PerformerConfig, PerformerEncoder

    cfg = {"vocab_size": task.vocab_size, "dim": 64, "depth": 2, "heads": 2, "max_len": L, "seed": 0, **kw}
    return PerformerEncoder(PerformerConfig(**cfg))


def grad_check(task) -> float:
    from favor.paper.grad_check import reference_grad_error

    return reference_grad_error(_model(task).double(), task, task.batch(1, 0))


def per_layer(model, task, measure, *, rows: int | None = None) -> list[dict]:
    """One eval batch through ``model``; for every attention layer, ``measure(module, q, k,
    logits)`` of its rotated queries and keys (the first ``rows`` sequences) -> a dict."""
    import torch

    from favor.nn.rotary import apply_rotary

    batch, stats = task.eval_set[0], []

    def hook(mod, args, kwargs, out):
        x = args[0] if rows is None else args[0][:rows]
        q, k = apply_rotary(mod._heads(mod.q_proj(x)), 0), apply_rotary(mod._heads(mod.k_proj(x)), 0)
        stats.append(measure(mod, q, k, q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])))

    hooks = [blk.attn.register_forward_hook(hook, with_kwargs=True) for blk in model.blocks]
    with torch.no_grad():
        task.logits(model, batch)
    for h in hooks:
        h.remove()
    return stats


def attention_stats(model, task) -> list[dict]:
    def measure(mod, q, k, logits):
        d = q.shape[-1]
        p = logits.softmax(-1)
        return {
            "entropy": (-(p * p.clamp_min(1e-12).log()).sum(-1)).mean((0, 2)).tolist(),
            "max_weight": p.max(-1).values.mean((0, 2)).tolist(),
            "logit_std": logits.std((0, 2, 3)).tolist(),
            "q_norm": (q * d**-0.25).norm(dim=-1).mean((0, 2)).tolist(),
            "k_norm": (k * d**-0.25).norm(dim=-1).mean((0, 2)).tolist(),
        }

    return per_layer(model, task, measure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.books_plateau", description=__doc__)
    parser.add_argument("--steps", type=int, default=300, help="softmax training steps before the probes")
    parser.add_argument("--sweep", action="store_true", help="also train the SWEEP settings from scratch")
    parser.add_argument("--sweep-steps", type=int, default=300)
    parser.add_argument("--out", default="benchmarks/results/paper/plateau")
    args = parser.parse_args(argv)
    import torch

    from favor.paper.harness import ModelSize, Variant, train_run
    from favor.paper.transfer import swap_to_favor

    torch.set_num_threads(1)
    info = header(f"books plateau probes: L={L}, batch {BATCH}, lr {LR}, warm-up {WARMUP}")
    task = _task()
    out = {"machine": info, "unigram": task.unigram(), "config": {"L": L, "batch": BATCH, "lr": LR, "warmup": WARMUP}}
    torch.set_default_dtype(torch.float64)
    out["grad_rel_err_fast_vs_reference_float64"] = grad_check(task)
    torch.set_default_dtype(torch.float32)
    print("gradient, fast path vs L x L reference (float64, relative):", out["grad_rel_err_fast_vs_reference_float64"])
    t0 = time.perf_counter()
    soft = train_run(
        task,
        Variant("softmax", attention="softmax"),
        ModelSize(max_len=L),
        seed=0,
        steps=args.steps,
        eval_every=100,
        lr=LR,
        warmup=WARMUP,
    )
    model = soft.pop("model")
    out["softmax_curve"] = [(p["step"], p["accuracy"]) for p in soft["curve"]]
    out["softmax_attention"] = attention_stats(model, task)
    out["ln_L"] = math.log(L)
    print("softmax", out["softmax_curve"], f"({time.perf_counter() - t0:.0f} s)")
    for i, s in enumerate(out["softmax_attention"]):
        print(f"layer {i}:", {k: [round(x, 3) for x in v] for k, v in s.items()}, f"(ln L = {math.log(L):.2f})")
    out["swap_accuracy_by_M"] = {}
    for m in (111, 512, 2048, 8192):
        accs = []
        for draw in range(3):
            swapped = swap_to_favor(model, ModelSize(max_len=L, num_features=m), vocab_size=task.vocab_size, seed=draw)
            accs.append(task.evaluate(swapped.eval())["accuracy"])
        out["swap_accuracy_by_M"][m] = accs
        print(f"softmax weights in FAVOR+, M = {m}: masked accuracy {[round(a, 3) for a in accs]}")
    if args.sweep:
        out["sweep"] = {}
        for name, (model_kw, train_kw, redraw) in SWEEP.items():
            kw = {"lr": LR, "warmup": WARMUP, **train_kw}
            variant = Variant(name, attention=model_kw.get("attention", "favor"), redraw=redraw)
            r = train_run(
                task,
                variant,
                ModelSize(max_len=L),
                seed=0,
                steps=args.sweep_steps,
                eval_every=100,
                model=_model(task, **model_kw),
                **kw,
            )
            out["sweep"][name] = {
                "curve": [(p["step"], p["accuracy"]) for p in r["curve"]],
                "sec_per_step": r["sec_per_step"],
            }
            print(f"{name:28s}", [(s, round(a, 3)) for s, a in out["sweep"][name]["curve"][1:]])
    path = Path(args.out)
    path.mkdir(parents=True, exist_ok=True)
    (path / "probe.json").write_text(json.dumps(out, indent=2, default=str))
    print(f"wrote {path / 'probe.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
