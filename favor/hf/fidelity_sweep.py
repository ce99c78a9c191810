"""How close a Performer-swapped pretrained model stays to its softmax self, over kernels and
numbers of features: the sweep behind ``favor performerize``.

For each kernel and M: performerize the model (calibrated on the calibration text: key
shift, query/key balancing, FAVOR++ rho per head, or for "derf" the dense-exponential
features' per-direction parameters; optionally fitted), then on held-out text measure the
cosine between the softmax and FAVOR sentence embeddings (mean pooling) and each layer's
relative attention-output error at each held-out length (the passages packed to exactly
that length). A protein masked LM is calibrated on and evaluated with antibody V regions
(favor.hf.antibodies) and also scored by masked-residue accuracy next to the softmax
model's. Writes performerize.json and performerize.png.
"""

from __future__ import annotations

import copy
import json
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import torch
from torch import nn

from .antibodies import masked_accuracy, masked_batches
from .fidelity import (
    embedding_cosine,
    eval_lengths,
    held_out_batches,
    layer_errors,
    max_length,
    split_texts,
    tokenize_batches,
)
from .fit import fit_adapters
from .performerize import performerize

__all__ = ["SweepConfig", "performerize_sweep", "DEFAULT_KERNELS", "DEFAULT_M"]

DEFAULT_KERNELS = ("positive", "oprf", "derf")
DEFAULT_M = (64, 256, 1024)


@dataclass(frozen=True)
class SweepConfig:
    """The sweep's options (``favor performerize``'s flags). ``None`` for ``max_length``
    (calibration tokens per passage: 128; a masked LM: 160), ``eval_lengths`` (128 and 512;
    a masked LM: 160) and ``samples`` (held-out passages per length: 32; a masked LM: 64)
    picks the default for the model's kind. ``naive`` adds the uncalibrated swap,
    ``fit_steps`` a fitted copy of each calibrated one; ``features`` are performerize's
    feature options (projection, key shift, exact terms)."""

    kernels: tuple[str, ...] = DEFAULT_KERNELS
    num_features: tuple[int, ...] = DEFAULT_M
    text: str = "heldout"
    calibration_text: str = "train"
    calibration_samples: int = 32
    mask_seed: int = 0
    samples: int | None = None
    eval_lengths: tuple[int, ...] | None = None
    max_length: int | None = None
    fit_steps: int = 0
    naive: bool = False
    seed: int = 0
    features: dict[str, Any] = field(default_factory=dict)


def _plot(rows: list[dict], path: Path, softmax_accuracy: float | None = None) -> None:
    matplotlib.use("Agg")

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


def performerize_sweep(
    base: nn.Module,
    tok,
    kind: str,
    config: SweepConfig,
    *,
    out: str | Path,
    name: str,
    echo: Callable[[str], None],
    progress: Callable[[list], Iterable] | None = None,
) -> tuple[dict[str, Any], nn.Module | None]:
    """Performerize ``base`` (``kind`` as ``favor.hf.models.load_softmax`` says; ``name`` goes
    to the report) for every kernel, M and mode of ``config`` and measure each against it;
    writes OUT/performerize.json and performerize.png, sends the table to ``echo``, and
    returns ({"meta", "rows"}, the last model). ``progress`` wraps the list of
    configurations (e.g. tqdm). ValueError when the held-out text does not fit the lengths."""
    cfg = config
    length = max_length(cfg.max_length, kind, 128)
    mlm = kind == "masked-lm"
    positions = getattr(base.config, "max_position_embeddings", None) or 1 << 30
    lengths = eval_lengths(cfg.eval_lengths, kind, length, limit=positions)
    samples = cfg.samples or (64 if mlm else 32)
    evs = {n: held_out_batches(tok, cfg.text, kind, length=n, count=samples) for n in lengths}
    held = split_texts(cfg.text, kind, samples)
    cal = split_texts(cfg.calibration_text, kind, cfg.calibration_samples)
    cb = tokenize_batches(tok, cal, max_length=length)
    if mlm:
        mb = masked_batches(tok, [s.replace(" ", "") for s in held], seed=cfg.mask_seed)
        softmax_acc, n_masked = masked_accuracy(base, mb)
    kernels = list(cfg.kernels)
    ms = list(cfg.num_features)
    modes = (["naive"] if cfg.naive else []) + ["calibrated"] + (["fitted"] if cfg.fit_steps else [])
    rows, model = [], None
    jobs = [(k, m, mode) for k in kernels for m in ms for mode in modes if mode != "fitted"]
    for kernel, m, mode in jobs if progress is None else progress(jobs):
        t0 = time.perf_counter()
        model = performerize(
            copy.deepcopy(base),
            kernel=kernel,
            num_features=m,
            seed=cfg.seed,
            calibration=cb if mode != "naive" else None,
            **cfg.features,
        )
        results = [(mode, model)]
        if mode == "calibrated" and cfg.fit_steps:
            fitted = copy.deepcopy(model)
            fit_adapters(fitted, cb, steps=cfg.fit_steps)
            results.append(("fitted", fitted))
        for mode_name, mdl in results:
            extra = {"masked_accuracy": masked_accuracy(mdl, mb)[0]} if mlm else {}
            for n, ev in evs.items():
                cos = embedding_cosine(mdl, ev)
                errs = layer_errors(mdl, ev[:2])
                rows.append(
                    {
                        **extra,
                        "kernel": kernel,
                        "num_features": m,
                        "mode": mode_name,
                        "length": n,
                        "passages": int(cos.numel()),
                        "cosine_mean": float(cos.mean()),
                        "cosine_min": float(cos.min()),
                        "layer_errors": [round(e, 5) for e in errs],
                        "seconds": round(time.perf_counter() - t0, 1),
                    }
                )
            model = mdl
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": name,
        "dtype": str(next(base.parameters()).dtype),
        "held_out": {
            "text": cfg.text,
            "passages": {n: sum(len(b["input_ids"]) for b in ev) for n, ev in evs.items()},
            "lengths": lengths,
            "packed": not mlm,
        },
        **cfg.features,
        "calibration": {"text": cfg.calibration_text, "passages": len(cal), "fit_steps": cfg.fit_steps},
        "seed": cfg.seed,
        **(
            {"masked": {"residues": n_masked, "rate": 0.15, "seed": cfg.mask_seed, "softmax_accuracy": softmax_acc}}
            if mlm
            else {}
        ),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    (out / "performerize.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    _plot(rows, out / "performerize.png", softmax_acc if mlm else None)
    echo(f"\n{name}: embedding cosine to the softmax model on held-out passages of {lengths} tokens")
    if mlm:
        echo(f"masked-residue accuracy on {n_masked} masked held-out residues: softmax {softmax_acc:.4f}")
    acc_head = f" {'mask acc':>8}" if mlm else ""
    echo(
        f"{'kernel':>9} {'M':>5} {'mode':>10} {'L':>5} {'cos mean':>9} {'cos min':>8}{acc_head}  per-layer attention error"
    )
    for r in rows:
        errs = " ".join(f"{e:.3f}" for e in r["layer_errors"])
        acc = f" {r['masked_accuracy']:>8.4f}" if mlm else ""
        echo(
            f"{r['kernel']:>9} {r['num_features']:>5} {r['mode']:>10} {r['length']:>5} {r['cosine_mean']:>9.4f}"
            f" {r['cosine_min']:>8.4f}"
            f"{acc}  {errs}"
        )
    echo(f"wrote {out / 'performerize.json'} and {out / 'performerize.png'}")
    return {"meta": meta, "rows": rows}, model
