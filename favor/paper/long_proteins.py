"""favor paper long-proteins: concatenated proteins at L = 8192 (Fig. 7 left), small.

Proteins are concatenated (<bos> residues <eos> ...) into windows of 8,192 tokens for
next-residue prediction. By default (``--proteins families``) the stream holds only the
proteins of the embedded extract that have a relative in it (sharing >= 10 % of their
distinct 5-mers: favor.data.families), relatives side by side, whole families held out for
validation: like the paper's concatenated TrEMBL, the context then holds something to copy
(a 5-residue repeat in the window predicts the next residue right 84 % of the time), where a
random extract in accession order (``--proteins all``) holds nothing a model can use beyond
the next few residues (unigram 2.912 nats, bigram 2.879, trigram 2.873).
A Performer (FAVOR+, redraw every step) of ``--depth`` layers is
timed; then exact Transformers of 1, 2, ... layers are timed on the same batch, and the
deepest whose training step is no slower than the Performer's is kept (the paper: the
deepest that fits the accelerator's memory; on a CPU memory is not the limit, time is).
The hybrid Performer (the same depth, FAVOR+ with M = 64 features beside an exact 64-residue
window and 4 sinks) is timed and trained beside them. All train for the same wall-clock time
(one after another in one process) with one schedule and one logit-bias start (--lr,
--warmup, --output-bias-init); accuracy curves on held-out proteins, read at the largest
wall time and the largest CPU time (process_time: what other jobs on the machine do not
inflate at one thread) every model reached. Unigram and bigram
baselines (training counts) mark what needs no context, the copy baseline what the context
offers to a model that copies repeats.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import replace
from typing import Any

import torch

from ..data import ProteinTokenizer, TokenStream, load_proteins, split
from ..data.families import family_order, split_families
from .harness import ModelSize, Variant, at_time, build_model, hybrid, train_run
from .report import markdown_table
from .suite import run_command, save_suite
from .tasks import CausalLM, StreamSource, metrics_from

NAME = "long_proteins"

#: mode -> (ModelSize, L, Performer depth, seconds of training per model, eval_every, eval windows);
#: the full mode: three models x 600 s plus step timing and evaluation, about 35 minutes on one
#: thread (270 s each left all three at the unigram level: docs/paper.md, "long-proteins at 8,192")
MODES = {
    "quick": (ModelSize(dim=32, depth=2, heads=2, max_len=256), 256, 2, 2.0, 2, 1),
    "full": (ModelSize(dim=64, depth=6, heads=2, max_len=8192), 8192, 6, 600.0, 10, 4),
}
#: Adam's learning rate for all three models, constant after WARMUP linear warm-up steps; 1e-3
#: until the 600 s budget; 3e-3 made the hybrid's loss jump to 5.0 at the end of the warm-up
#: (a 120 s probe). The demo LM's recipe (a unigram-started logit bias, lr 1e-2 or 5e-3 after 5
#: warm-up steps) was probed here too: it reaches the same plateau sooner, not a lower one, and
#: the hybrid does not get ahead of the exact model (docs/paper.md, "long-proteins with the
#: demo's recipe"), so the defaults stay those of the recorded 600 s run
LR = 2e-3
WARMUP = 20
#: how every model's logit bias starts: "none" (no logit bias: the recorded runs), "zeros", or
#: "unigram", at the training residues' log frequencies (the first steps then need not learn them)
OUTPUT_BIAS_INITS = ("none", "zeros", "unigram")
OUTPUT_BIAS_INIT = "none"
#: the hybrid's random features: the window carries the sharp attention, the features only
#: the far keys (the text preset's choice, docs/paper.md "Fewer features beside the window");
#: its step at 8k: 1.1 s against 2.2 s with the default M = 111 (one probe each, load ~2)
HYBRID_FEATURES = 64
#: which proteins form the stream (see --proteins and favor.data.families)
PROTEINS = ("families", "all")
#: --quick computes families over this many proteins only (seconds, not 17 s for 8,000)
QUICK_PROTEINS = 1500


def protein_split(records, proteins: str, *, quick: bool):
    """(train, val) records: ``families`` keeps proteins with a relative (sharing >= 10 % of
    5-mers), relatives adjacent, whole families held out; ``all`` the random split."""
    if proteins == "all":
        return split(records, val_fraction=0.05, seed=0)
    if proteins != "families":
        raise ValueError(f"proteins must be one of {PROTEINS}, got {proteins!r}")
    return split_families(family_order(records[:QUICK_PROTEINS] if quick else records), val_fraction=0.05, seed=0)


def add_arguments(parser) -> None:
    parser.add_argument("--seconds", type=float, default=None, help="training seconds per model (default: the mode's)")
    parser.add_argument("--depth", type=int, default=None, help="Performer layers (default: 6; 2 with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--lr", type=float, default=LR, help=f"Adam learning rate of every model (default {LR})")
    parser.add_argument("--warmup", type=int, default=WARMUP, help=f"linear warm-up steps (default {WARMUP})")
    parser.add_argument(
        "--output-bias-init",
        choices=OUTPUT_BIAS_INITS,
        default=OUTPUT_BIAS_INIT,
        help="a logit bias for every model, started at the training residues' log frequencies (unigram) or at "
        f"zeros, or none (default: {OUTPUT_BIAS_INIT})",
    )
    parser.add_argument("--data", default=None, help="protein FASTA (default: the embedded 8,000 Swiss-Prot proteins)")
    parser.add_argument(
        "--proteins",
        choices=PROTEINS,
        default="families",
        help="families: only proteins with a relative in the data (5-mers shared), relatives side by side, "
        "whole families held out; all: every protein in file order, a random split (default: families)",
    )


#: the copy baseline's match length: a 5-residue repeat predicts the next residue right 84 %
#: of the time in the family stream (8 % in the random one)
COPY_K = 5


def copy_baseline(task, *, k: int = COPY_K) -> dict[str, float]:
    """What the context offers without learning: for each scored target, if the last ``k``
    inputs occurred earlier in the row, predict the token that followed their latest
    occurrence (probability 1 - a, the rest spread evenly), else the bigram's argmax; a
    (0.5) keeps the loss finite. Accuracy is the number to read; ``copied`` the fraction of
    targets predicted by a repeat."""
    tokens, v = task.train.tokens, task.vocab_size
    counts = torch.bincount(tokens[:-1] * v + tokens[1:], minlength=v * v).reshape(v, v)
    guess = counts.argmax(-1).tolist()
    correct = count = copied = 0
    loss_sum = 0.0
    for b in task.eval_set:
        for row, ys, ws in zip(b.inputs.tolist(), b.targets.tolist(), b.weight.tolist(), strict=True):
            last: dict[tuple[int, ...], int] = {}
            for t, (y, w) in enumerate(zip(ys, ws, strict=True)):
                key = tuple(row[t - k + 1 : t + 1]) if t >= k - 1 else None
                pred = row[last[key] + 1] if key in last else None
                if key is not None:
                    last[key] = t
                if not w:
                    continue
                count += 1
                if pred is None:
                    pred = guess[row[t]]
                else:
                    copied += 1
                right = pred == y
                correct += right
                loss_sum -= math.log(0.5 if right else 0.5 / (v - 1))
    return {**metrics_from(loss_sum, correct, count), "copied": copied / max(1, count)}


def step_seconds(task, variant: Variant, size: ModelSize, *, repeats: int = 2) -> float:
    """Median seconds of a forward+backward+Adam step (after one warm-up step)."""
    model = build_model(variant, size, vocab_size=task.vocab_size, causal=True, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for i in range(repeats + 1):
        b = task.batch(i, 0)
        t0 = time.perf_counter()
        loss = task.loss(model, b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def experiment(
    *,
    quick: bool,
    seconds: float | None = None,
    depth: int | None = None,
    data: str | None = None,
    lr: float = LR,
    warmup: int = WARMUP,
    output_bias_init: str = OUTPUT_BIAS_INIT,
    proteins: str = "families",
    progress=None,
) -> dict[str, Any]:
    if output_bias_init not in OUTPUT_BIAS_INITS:
        raise ValueError(f"output_bias_init must be one of {OUTPUT_BIAS_INITS}, got {output_bias_init!r}")
    size, length, p_depth, budget, eval_every, eval_rows = MODES["quick" if quick else "full"]
    budget, p_depth = seconds or budget, depth or p_depth
    size = replace(size, depth=p_depth, output_bias=output_bias_init != "none")
    records = load_proteins(data)
    train, val = protein_split(records, proteins, quick=quick)
    tok = ProteinTokenizer()
    task = CausalLM(
        StreamSource(TokenStream(train, tok).tokens, length + 1),
        StreamSource(TokenStream(val, tok).tokens, length + 1),
        vocab_size=tok.vocab_size,
        batch_size=1,
        eval_rows=eval_rows,
    )
    performer = Variant(f"Performer ({p_depth} layers)", kernel="positive")
    mixed = hybrid(f"hybrid Performer ({p_depth} layers, M={HYBRID_FEATURES})", num_features=HYBRID_FEATURES)
    t_perf = step_seconds(task, performer, size)
    timings = {performer.name: t_perf, mixed.name: step_seconds(task, mixed, size)}
    exact_depth = 1
    for d in range(1, p_depth + 1):
        t = step_seconds(task, Variant("exact", attention="softmax"), replace(size, depth=d))
        timings[f"exact ({d} layers)"] = t
        if t > t_perf and d > 1:
            break
        if t <= t_perf:
            exact_depth = d
    exact = Variant(f"Transformer (exact, {exact_depth} layers)", attention="softmax", depth=exact_depth)
    bias = task.log_frequencies() if output_bias_init == "unigram" else None
    cap = 100_000
    if progress is not None:
        progress.total = 3 * int(budget)
    runs, load = [], {}
    for v in (performer, mixed, exact):
        tick = None
        if progress is not None:
            progress.set_postfix_str(v.name)
        before = os.getloadavg()[0]
        r = train_run(
            task, v, size, seed=0, steps=cap, eval_every=eval_every, time_limit=budget, progress=tick,
            lr=lr, warmup=warmup, logit_bias=bias,
        )  # fmt: skip
        load[v.name] = [before, os.getloadavg()[0]]
        r.pop("model")
        runs.append(r)
        if progress is not None:
            progress.update(int(budget))
    t_common = min(r["curve"][-1]["time"] for r in runs)
    cpu_common = min(r["curve"][-1]["cpu_time"] for r in runs)
    rows = []
    for r in runs:
        name, last = r["variant"]["name"], r["curve"][-1]
        wall, cpu = at_time(r["curve"], t_common), at_time(r["curve"], cpu_common, clock="cpu_time")
        rows.append(
            {
                "model": name,
                "s/step (timed)": timings.get(name, timings[f"exact ({exact_depth} layers)"]),
                "steps": last["step"],
                "cpu s/step": last["cpu_time"] / max(1, last["step"]),
                "accuracy": wall["accuracy"],
                "loss": wall["loss"],
                "accuracy (cpu)": cpu["accuracy"],
                "loss (cpu)": cpu["loss"],
                "params": r["params"],
                "load": load[name],
            }
        )
    config = {
        "mode": "quick" if quick else "full",
        "length": length,
        "seconds_per_model": budget,
        "lr": lr,
        "warmup": warmup,
        "output_bias_init": output_bias_init,
        "eval_windows": eval_rows,
        "performer_depth": p_depth,
        "exact_depth": exact_depth,
        "step_seconds": timings,
        "model": {"dim": size.dim, "heads": size.heads},
        "redraw_interval": 1,
        "batch": 1,
        "data": data or "embedded 8,000 Swiss-Prot",
        "proteins": proteins,
        "train_proteins": len(train),
        "val_proteins": len(val),
        "train_tokens": int(task.train.tokens.numel()),
    }
    return {
        "runs": runs,
        "rows": rows,
        "time": t_common,
        "cpu_time": cpu_common,
        "config": config,
        "unigram": task.unigram(),
        "bigram": task.bigram(),
        "copy": copy_baseline(task),
    }


def table(res: dict[str, Any]) -> str:
    header = [
        "model",
        "s/step (timed before training)",
        "steps trained",
        "CPU s/step (training)",
        f"accuracy @ {res['time']:.0f} s wall",
        "loss",
        f"accuracy @ {res['cpu_time']:.0f} s CPU",
        "loss",
        "params",
        "load (1 min) at start, end",
    ]
    rows = [
        [
            r["model"],
            r["s/step (timed)"],
            r["steps"],
            r["cpu s/step"],
            r["accuracy"],
            r["loss"],
            r["accuracy (cpu)"],
            r["loss (cpu)"],
            r["params"],
            "{:.2f}, {:.2f}".format(*r["load"]),
        ]
        for r in res["rows"]
    ]
    for name in ("unigram", "bigram", f"copy (k={COPY_K})"):
        base = res[name.split()[0]]
        loss = "-" if name.startswith("copy") else base["loss"]  # the copy rule's loss is a convention
        rows.append([f"{name} baseline", "-", "-", "-", base["accuracy"], loss, "-", "-", "-", "-"])
    return markdown_table(header, rows)


def run(args) -> int:
    return run_command(
        args,
        "long-proteins",
        experiment,
        save,
        incremental=False,
        unit="s",
        seconds=args.seconds,
        depth=args.depth,
        data=args.data,
        lr=args.lr,
        warmup=args.warmup,
        output_bias_init=args.output_bias_init,
        proteins=args.proteins,
    )


def save(args, res):
    t = table(res)
    c = res["config"]
    title = (
        f"long-proteins: concatenated Swiss-Prot ({c.get('proteins', 'all')}), L={c['length']}, {c['seconds_per_model']:.0f} s of training each "
        f"(lr {c['lr']:g} after {c['warmup']} warm-up steps, logit bias: {c['output_bias_init']}); "
        f"Performer and hybrid {c['performer_depth']} layers vs the deepest exact model as fast per step"
    )
    return t, save_suite(args.out, NAME, res, t, metric="accuracy", title=title)
