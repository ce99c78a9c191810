"""favor paper transfer: softmax weights into a Performer, then fine-tuning (Fig. 5 left).

The softmax masked LM of ``favor paper books`` in its full setting (the same corpus, model,
optimiser and context: dim 128, 4 heads, L = 2,048 bytes per step, grown from 128 bytes over
the first half of pre-training by books' sequence-length warm-up) is trained; its weights
are loaded unchanged into the same model with FAVOR+ attention (no distillation; the
Performer only adds random projections), which is then fine-tuned on the same masked-LM
loss at the full 2,048-byte context from the first step. Reported: the accuracy right after
the swap, the steps until the Performer comes within 1 % (relative) of the softmax model's
accuracy, and the same for a Performer trained from scratch with the softmax model's budget
plus the fine-tuning steps, on the softmax model's length schedule (the same warm-up over
the first half of the pre-training steps, then 2,048 bytes for the rest). The same weights
also go into the hybrid Performer (FAVOR+ with an exact 64-byte window and 4 sinks), which
is fine-tuned the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .antiberty_transfer import antiberty_available, antiberty_transfer
from .books import LR, WARMUP, add_data_arguments, context_plan, corpus, make_task
from .books import MODES as BOOKS
from .harness import ModelSize, Variant, build_model, hybrid, train_run
from .report import markdown_table, write_outputs
from .suite import progress_bar, run_command, save_suite

NAME = "transfer"
SOFTMAX = Variant("softmax (pretrained)", attention="softmax")
SWAPPED = Variant("FAVOR+ from softmax weights", kernel="positive")
SCRATCH = Variant("FAVOR+ from scratch", kernel="positive")
HYBRID = hybrid("hybrid FAVOR+ from softmax weights")
FRESH = 1000

#: mode -> (pre-training steps, fine-tuning steps, eval_every, eval rows); the model size,
#: context, batch and length warm-up are books' (``books.MODES``, ``books.CURRICULUM``).
#: Full: 400 pre-training steps as books, 250 fine-tuning steps, evaluation every 20 steps
#: (for the steps-to-99 % count) on 8 held-out windows of 2,048 bytes (~2,450 masked bytes,
#: half of books' 16, to keep its cost down)
MODES = {"quick": (4, 4, 2, 2), "full": (400, 250, 20, 8)}


def add_arguments(parser) -> None:
    parser.add_argument("--seeds", type=int, default=None, help="seeds (default 1)")
    parser.add_argument("--steps", type=int, default=None, help="softmax pre-training steps (default: the mode's)")
    parser.add_argument("--finetune-steps", type=int, default=None, help="Performer fine-tuning steps")
    add_data_arguments(parser, steps="the pre-training steps")
    parser.add_argument("--lr", type=float, default=LR, help=f"Adam learning rate (default {LR}, as books)")
    parser.add_argument(
        "--finetune-lr", type=float, default=None, help="Adam learning rate of the fine-tuning (default: --lr)"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=WARMUP,
        help=f"warm-up steps of the models trained from scratch (default {WARMUP})",
    )
    parser.add_argument("--part", choices=("all", "books", "antiberty"), default="all", help="which transfer to run")
    parser.add_argument(
        "--antiberty-steps", type=int, default=None, help="AntiBERTy fine-tuning steps (default 60; 0 with --quick)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")


def steps_within(curve: list[dict[str, Any]], target: float, *, metric: str = "accuracy") -> int | None:
    """The first evaluated step whose ``metric`` reaches ``target`` (None if none does)."""
    return next((p["step"] for p in curve if p[metric] >= target), None)


def swap_to_favor(softmax_model, size: ModelSize, *, vocab_size: int, seed: int, variant: Variant = SWAPPED):
    """The same architecture with ``variant``'s attention (default FAVOR+), holding the softmax
    model's weights."""
    model = build_model(variant, size, vocab_size=vocab_size, causal=False, seed=seed)
    missing, unexpected = model.load_state_dict(softmax_model.state_dict(), strict=False)
    if unexpected or any(not k.endswith(("feature_map.projection", "feature_map.rho")) for k in missing):
        raise RuntimeError(f"weights do not carry over: missing {missing}, unexpected {unexpected}")
    return model


def experiment(
    *,
    quick: bool,
    seeds: int | None = None,
    steps: int | None = None,
    finetune: int | None = None,
    seq_len: int | None = None,
    batch: int | None = None,
    lr: float = LR,
    finetune_lr: float | None = None,
    warmup: int = WARMUP,
    length_warmup: float | None = None,
    data_dir: str | Path | None = None,
    austen: bool = True,
    progress=None,
) -> dict[str, Any]:
    mode = "quick" if quick else "full"
    size, n_len, n_batch = BOOKS[mode][:3]
    n_pre, n_fine, eval_every, eval_rows = MODES[mode]
    pre, fine, seeds = steps or n_pre, finetune or n_fine, seeds or 1
    seq_len, batch = seq_len or n_len, batch or n_batch
    # the softmax model and the from-scratch Performer grow the context over the first
    # ``fraction`` of the pre-training steps (the scratch run then continues at full length);
    # fine-tuning is at full length throughout
    size, eval_rows, lengths, (start, fraction) = context_plan(
        mode, size, seq_len=seq_len, eval_rows=eval_rows, steps=pre, length_warmup=length_warmup
    )
    train, val, note = corpus(quick=quick, data_dir=data_dir, austen=austen)
    grown = make_task(train, val, seq_len=seq_len, batch=batch, eval_rows=eval_rows, length_at=lengths)
    full = make_task(train, val, seq_len=seq_len, batch=batch, eval_rows=eval_rows)  # the same evaluation set
    if progress is not None:
        progress.total = seeds * (pre + fine + fine + pre + fine)
    runs, rows = [], []
    tick = progress.update if progress is not None else None
    for seed in range(seeds):
        soft = train_run(
            grown, SOFTMAX, size, seed=seed, steps=pre, eval_every=eval_every, lr=lr, warmup=warmup, progress=tick
        )
        target = 0.99 * soft["curve"][-1]["accuracy"]
        soft_model = soft.pop("model")
        # fine-tuning starts from trained weights (no warm-up) on batches the softmax model
        # did not see (the batch stream of seed + FRESH): FAVOR+ alone, and the hybrid
        tuned, mixed = (
            train_run(
                full,
                name,
                size,
                seed=seed + FRESH,
                steps=fine,
                eval_every=eval_every,
                warmup=0,
                lr=lr if finetune_lr is None else finetune_lr,
                model=swap_to_favor(soft_model, size, vocab_size=full.vocab_size, seed=seed, **kw),
                progress=tick,
            )
            for name, kw in ((SWAPPED, {}), (HYBRID, {"variant": HYBRID}))
        )
        scratch = train_run(
            grown,
            SCRATCH,
            size,
            seed=seed,
            steps=pre + fine,
            eval_every=eval_every,
            lr=lr,
            warmup=warmup,
            progress=tick,
        )
        for r in (tuned, mixed, scratch):
            r.pop("model")
        runs += [soft, tuned, mixed, scratch]
        rows.append(
            {
                "seed": seed,
                "softmax_accuracy": soft["curve"][-1]["accuracy"],
                "swap_accuracy": tuned["curve"][0]["accuracy"],
                "finetuned_accuracy": tuned["curve"][-1]["accuracy"],
                "finetune_steps_to_99pct": steps_within(tuned["curve"], target),
                "hybrid_swap_accuracy": mixed["curve"][0]["accuracy"],
                "hybrid_finetuned_accuracy": mixed["curve"][-1]["accuracy"],
                "hybrid_finetune_steps_to_99pct": steps_within(mixed["curve"], target),
                "scratch_accuracy_same_steps_as_finetune": next(
                    p["accuracy"] for p in scratch["curve"] if p["step"] >= fine
                ),
                "scratch_steps_to_99pct": steps_within(scratch["curve"], target),
                "scratch_final_accuracy": scratch["curve"][-1]["accuracy"],
            }
        )
    config = {
        "mode": mode,
        "corpus": note,
        "seq_len": seq_len,
        "batch": batch,
        "length_warmup": None
        if lengths is None
        else {"start": start, "fraction": fraction, "of_steps": pre, "applies_to": ["softmax", "scratch"]},
        "finetune_seq_len": seq_len,
        "eval_rows": eval_rows,
        "eval_every": eval_every,
        "lr": lr,
        "finetune_lr": lr if finetune_lr is None else finetune_lr,
        "warmup": warmup,
        "pretrain_steps": pre,
        "finetune_steps": fine,
        "seeds": seeds,
        "redraw_interval": 1,
        "model": {"dim": size.dim, "depth": size.depth, "heads": size.heads},
    }
    return {"runs": runs, "rows": rows, "unigram": full.unigram(), "config": config}


def table(res: dict[str, Any]) -> str:
    c = res["config"]
    header = [
        "seed",
        f"softmax acc ({c['pretrain_steps']} steps)",
        "FAVOR+ right after the swap",
        f"after {c['finetune_steps']} fine-tuning steps",
        "fine-tuning steps to 99 % of softmax",
        "hybrid right after the swap",
        f"hybrid after {c['finetune_steps']} fine-tuning steps",
        "hybrid: fine-tuning steps to 99 %",
        f"FAVOR+ from scratch at {c['finetune_steps']} steps",
        f"from scratch: steps to 99 % (of {c['pretrain_steps'] + c['finetune_steps']})",
    ]
    rows = [
        [
            r["seed"],
            r["softmax_accuracy"],
            r["swap_accuracy"],
            r["finetuned_accuracy"],
            r["finetune_steps_to_99pct"] if r["finetune_steps_to_99pct"] is not None else "not reached",
            r.get("hybrid_swap_accuracy", "-"),
            r.get("hybrid_finetuned_accuracy", "-"),
            "-"
            if "hybrid_swap_accuracy" not in r
            else (
                r["hybrid_finetune_steps_to_99pct"]
                if r["hybrid_finetune_steps_to_99pct"] is not None
                else "not reached"
            ),
            r["scratch_accuracy_same_steps_as_finetune"],
            r["scratch_steps_to_99pct"] if r["scratch_steps_to_99pct"] is not None else "not reached",
        ]
        for r in res["rows"]
    ]
    names = [SOFTMAX.name, SWAPPED.name, HYBRID.name, SCRATCH.name]
    unigram = f" Unigram baseline: {res['unigram']['accuracy']:.4f}." if "unigram" in res else ""
    return (
        "Masked-token accuracy on held-out books ("
        + ", ".join(names)
        + ")."
        + unigram
        + "\n\n"
        + markdown_table(header, rows)
    )


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.part in ("all", "books"):
        run_books(args)
    if args.part in ("all", "antiberty"):
        run_antiberty(args)
    return 0


def run_books(args) -> None:
    run_command(
        args,
        NAME,
        experiment,
        save,
        incremental=False,
        seeds=args.seeds,
        steps=args.steps,
        finetune=args.finetune_steps,
        seq_len=args.seq_len,
        batch=args.batch,
        lr=args.lr,
        finetune_lr=args.finetune_lr,
        warmup=args.warmup,
        length_warmup=args.warmup_lengths,
        data_dir=args.data_dir,
        austen=not args.no_austen,
    )


def save(args, res):
    t = table(res)
    c = res["config"]
    warm = c.get("length_warmup")
    grow = f" (pre-training grown from {warm['start']} over its first {warm['fraction']:.0%})" if warm else ""
    title = (
        f"transfer: softmax masked LM ({c['pretrain_steps']} steps) -> FAVOR+ fine-tuned, vs FAVOR+ from scratch; "
        f"L={c['seq_len']}{grow}, {c['corpus']}"
    )
    return t, save_suite(args.out, NAME, res, t, metric="accuracy", title=title)


def run_antiberty(args) -> None:
    """AntiBERTy performerized (plain FAVOR+) and fine-tuned; skipped when antiberty is
    missing or with 0 steps (the default of --quick)."""
    steps = args.antiberty_steps if args.antiberty_steps is not None else (0 if args.quick else 60)
    if steps <= 0:
        return
    if not antiberty_available():
        print("AntiBERTy part skipped: pip install --no-deps antiberty==0.1.3")
        return
    bar = progress_bar(steps, "antiberty")
    res = antiberty_transfer(steps=steps, eval_every=max(1, steps // 6), progress=bar.update)
    bar.close()
    c = res["curve"]
    header = [
        "softmax AntiBERTy",
        "plain FAVOR+ swap (M=256)",
        *[f"after {p['step']} steps" for p in c[1:]],
        "steps to 99 % of softmax",
    ]
    row = [
        res["softmax_accuracy"],
        c[0]["accuracy"],
        *[p["accuracy"] for p in c[1:]],
        res["steps_to_99pct"] if res["steps_to_99pct"] is not None else "not reached",
    ]
    t = (
        f"AntiBERTy masked-residue accuracy on the held-out V regions ({res['masked_residues']} masked), "
        f"fine-tuned on the masked-residue loss (lr {res['config']['lr']}, batch {res['config']['batch']}).\n\n"
        + markdown_table(header, [row])
    )
    paths = write_outputs(Path(args.out), "antiberty", res, t)
    print(t)
    print("wrote", ", ".join(str(p) for p in paths.values()))
