"""favor paper proteins: the paper's Table 2 (TrEMBL) on Swiss-Prot, small.

Proteins clipped at 1,024 residues, unidirectional (next-residue LM) and bidirectional
(15 % masked LM): exact Transformer vs Performer-ReLU vs Performer-softmax (FAVOR+) vs the
hybrid Performer (FAVOR+ with an exact 64-residue window and 4 sinks), all
redrawing features every step, scored by accuracy and perplexity on a random test split
and on an out-of-distribution split of 20 held-out homology clusters (proteins sharing an
exact 10-residue word; favor.paper.families; the paper held out 20 Pfam families), next to
the empirical unigram baseline. Data: favor's embedded 8,000 Swiss-Prot proteins, or any
FASTA via ``--data`` (e.g. the full set from ``favor data swissprot``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..data import ProteinTokenizer, load_proteins
from .families import family_split
from .harness import ModelSize, Variant, at_time, compare, hybrid
from .report import markdown_table
from .suite import add_common_arguments, run_command, run_suite, save_suite
from .tasks import CausalLM, MaskedLM, SequenceSource, WithEval

NAME = "proteins"

VARIANTS = [
    Variant("Transformer (exact)", attention="softmax"),
    Variant("Performer-ReLU", kernel="relu"),
    Variant("Performer-softmax", kernel="positive"),
    hybrid("Performer-hybrid"),
]

#: mode -> (ModelSize, clip length, batch, steps, eval_every, eval rows, seeds, proteins used, OOD families)
MODES = {
    "quick": (ModelSize(dim=32, depth=1, heads=2, max_len=65), 64, 2, 4, 2, 2, 1, 1500, 5),
    "full": (ModelSize(dim=64, depth=2, heads=2, max_len=1025), 1024, 4, 1000, 50, 16, 1, None, 20),
}


def add_arguments(parser) -> None:
    add_common_arguments(parser, seeds=MODES["full"][6])
    parser.add_argument("--data", default=None, help="protein FASTA (default: the embedded 8,000 Swiss-Prot proteins)")


def tasks(records: list[tuple[str, str]], *, length: int, batch: int, eval_rows: int, ood_families: int):
    """{"U": causal task, "B": masked task} (each also scoring the OOD split) and the split info."""
    tok = ProteinTokenizer()
    seqs = [s for _, s in records]
    train, test, ood, info = family_split(seqs, ood_families=ood_families, min_family=3 if ood_families >= 20 else 2)
    info.update(train=int(train.size), test=int(test.size), ood=int(ood.size))
    framed = [tok.encode(s, bos=True, eos=True) for s in seqs]
    bare = [tok.encode(s) for s in seqs]
    mask_id = tok.vocab_size

    def source(rows, idx, n):
        return SequenceSource([rows[i] for i in idx], n, tok.pad_id)

    out = {}
    common = {"batch_size": batch, "eval_rows": eval_rows}
    u = {
        n: CausalLM(
            source(framed, train, length + 1), source(framed, idx, length + 1), vocab_size=tok.vocab_size, **common
        )
        for n, idx in (("test", test), ("ood", ood))
    }
    b = {
        n: MaskedLM(
            source(bare, train, length),
            source(bare, idx, length),
            mask_id=mask_id,
            vocab_size=tok.vocab_size + 1,
            **common,
        )
        for n, idx in (("test", test), ("ood", ood))
    }
    out["U"] = WithEval(u["test"], {"ood": u["ood"]})
    out["B"] = WithEval(b["test"], {"ood": b["ood"]})
    return out, info


def experiment(
    *,
    quick: bool,
    seeds: int | None = None,
    steps: int | None = None,
    data: str | None = None,
    progress=None,
    on_result=None,
) -> dict[str, Any]:
    size, length, batch, n_steps, eval_every, eval_rows, n_seeds, n_prot, n_ood = MODES["quick" if quick else "full"]
    steps, seeds = steps or n_steps, seeds or n_seeds
    records = load_proteins(data)
    if n_prot is not None:
        records = records[:n_prot]
    ts, info = tasks(records, length=length, batch=batch, eval_rows=eval_rows, ood_families=n_ood)
    if progress is not None:
        progress.total = 2 * len(VARIANTS) * steps * seeds
    baselines = {d: {"test": t.unigram(), "ood": t.others["ood"].unigram()} for d, t in ts.items()}
    config = {
        "mode": "quick" if quick else "full",
        "data": data or "embedded 8,000 Swiss-Prot",
        "proteins": len(records),
        "clip": length,
        "batch": batch,
        "steps": steps,
        "seeds": seeds,
        "redraw_interval": 1,
        "lr": 1e-3,
        "split": info,
        "model": {"dim": size.dim, "depth": size.depth, "heads": size.heads},
    }
    runs: list[dict[str, Any]] = []

    def result(current):
        return {"runs": current, "summary": compare(current), "unigram": baselines, "config": config}

    for direction, task in ts.items():
        variants = [replace(v, name=f"{direction} {v.name}") for v in VARIANTS]
        done, _ = run_suite(
            task,
            variants,
            size,
            seeds=list(range(seeds)),
            steps=steps,
            eval_every=min(eval_every, steps),
            redraw_interval=1,
            progress=progress,
            on_run=None if on_result is None else lambda new, prev=list(runs): on_result(result(prev + new)),
        )
        runs += done
    return result(runs)


def table(res: dict[str, Any]) -> str:
    """Table 2's layout: per direction and model, test and OOD accuracy (%) and perplexity at
    the last common step, test accuracy at equal wall time, seconds per step."""
    s = res["summary"]
    rows = []
    for direction in ("U", "B"):
        base = res["unigram"][direction]
        rows.append(
            [
                f"{direction} empirical (unigram)",
                100 * base["test"]["accuracy"],
                base["test"]["perplexity"],
                100 * base["ood"]["accuracy"],
                base["ood"]["perplexity"],
                "-",
                "-",
            ]
        )
        for name in s["variants"]:
            if not name.startswith(direction + " "):
                continue
            mine = [r for r in res["runs"] if r["variant"]["name"] == name and r["diverged_at"] is None]
            if not mine:
                rows.append([name, "NaN", "NaN", "NaN", "NaN", "-", "-"])
                continue
            last = [next(p for p in r["curve"] if p["step"] == s["step"]) for r in mine]
            eq = [at_time(r["curve"], s["time"]) for r in mine]

            def mean(pts, key):
                return sum(p[key] for p in pts) / len(pts)

            rows.append(
                [
                    name,
                    100 * mean(last, "accuracy"),
                    mean(last, "perplexity"),
                    100 * mean(last, "ood_accuracy"),
                    mean(last, "ood_perplexity"),
                    100 * mean(eq, "accuracy"),
                    sum(r["sec_per_step"] for r in mine) / len(mine),
                ]
            )
    header = [
        "model (U: causal, B: masked)",
        f"test acc % @ {s['step']}",
        "test ppl",
        "OOD acc %",
        "OOD ppl",
        f"test acc % @ {s['time']:.0f} s",
        "s/step",
    ]
    return markdown_table(header, rows)


def save(args, res):
    t = table(res)
    c = res["config"]
    title = (
        f"proteins (Table 2): {c['data']}, clipped at {c['clip']}, U = causal LM, B = 15 % masked LM; "
        f"test accuracy; {c['seeds']} seed(s)"
    )
    paths = save_suite(
        args.out,
        NAME,
        res,
        t,
        metric="accuracy",
        title=title,
    )
    return t, paths


def run(args) -> int:
    return run_command(args, NAME, experiment, save, seeds=args.seeds, steps=args.steps, data=args.data)
