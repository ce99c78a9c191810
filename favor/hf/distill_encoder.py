"""The sentence-encoder / masked-LM distillation recipe behind ``favor distill --model DIR``.

Performerize a copy of the softmax teacher (calibrated on the training text), fit each
layer's adapter to its softmax attention (``fit_steps`` on ``fit_batches`` taken in turn from
the short and the packed passages: ``fit_on``), then train the attention query/key
projections and the adapters (``train``) to reproduce the teacher's hidden states and
mean-pooled embeddings (and token distributions, for LMs), with every layer's FAVOR output
also matched to softmax attention on its own q, k, v (``attention_weight``); save the student
with ``favor.hf.save_pretrained``, distill.json and distill.png (loss, and the held-out
embedding cosine per step at each held-out length). A protein masked LM trains on the
antibody V regions' training split (favor.hf.antibodies) with 15 % of residues masked and
also reports held-out masked-residue accuracy. The decoder recipe is ``favor.hf.linearize``.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import torch
from torch import nn

from .antibodies import masked_accuracy, masked_batches
from .distill import DistillConfig, distill
from .fidelity import (
    embedding_cosines,
    embeddings,
    eval_lengths,
    held_out_batches,
    max_length,
    packed_documents,
    split_texts,
    tokenize_batches,
)
from .fit import fit_adapters
from .io import save_pretrained
from .models import CORPORA, builtin_documents, model_texts
from .performerize import DEFAULTS, performerize
from .registry import NAME

__all__ = ["EncoderDistillConfig", "distill_encoder", "fit_set", "LONG_LENGTHS"]

#: packed training passages that `favor distill` adds for a sentence encoder (at most the
#: model's positions): on 64-token passages alone the 512-token fidelity falls while the
#: 128-token one rises; with exact blocks the 64-token lines are nearly all exact, and
#: 128-token passages lift the 128-token cosine from 0.990 to 0.994 (blocks of 64;
#: benchmarks/results/hf_fidelity_512.md)
LONG_LENGTHS = (128, 512)


@dataclass(frozen=True)
class EncoderDistillConfig:
    """The recipe's options (``favor distill``'s flags, encoder defaults). ``None`` for
    ``max_length`` (64; a masked LM: 160), ``long_lengths`` (``LONG_LENGTHS`` capped at the
    model's positions; none for a masked LM), ``eval_lengths`` (128 and 512; a masked LM:
    160), ``samples`` (32; a masked LM: 64) and ``fit_batches`` (one batch of each passage
    length, at least 2: 3 for a sentence encoder, the 512-token batch lifting 512's zero-shot;
    benchmarks/results/hf_fidelity_512.md, stop 22) picks the default for the model's kind.
    ``corpus`` ("english" or "kjv", ``favor.hf.models.CORPORA``) gives a sentence encoder's
    training ``text`` and ``heldout`` texts where they are None (the first held-out text gives
    the curve, the others are measured before and after training); a masked LM takes its
    built-in "train" / "heldout" splits.
    ``features`` are performerize's feature options (projection, key shift, exact terms)."""

    kernel: str = DEFAULTS["kernel"]
    num_features: int = 256
    steps: int = 3000
    minutes: float = 8.0
    batch_size: int = 8
    max_length: int | None = None
    maskings: int = 4
    long_lengths: tuple[int, ...] | None = None
    long_batch_size: int = 2
    eval_lengths: tuple[int, ...] | None = None
    lr: float = 2.5e-4
    samples: int | None = None
    eval_every: int = 200
    fit_steps: int = 40
    schedule: str = "cosine"
    train: str = "query-key"
    fit_batches: int | None = None
    fit_on: str = "mixed"
    adapter_lr: float = 3e-3
    gain_lr: float | None = None
    logit_weight: float = 1.0
    embedding_weight: float = 1.0
    attention_weight: float = 1.0
    seed: int = 0
    corpus: str = "english"
    text: str | None = None
    heldout: tuple[str, ...] | None = None
    features: dict[str, Any] = field(default_factory=dict)


def _plot(curve: dict, path: Path) -> None:
    matplotlib.use("Agg")

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.semilogy(range(1, len(curve["loss"]) + 1), curve["loss"])
    a1.set_xlabel("step")
    a1.set_ylabel("distillation loss")
    for n, cos in curve["eval_cosine"].items():
        a2.plot(curve["eval_steps"], cos, marker="o", label=f"{n} tokens")
    a2.legend(fontsize=8)
    a2.axhline(0.99, color="gray", ls=":")
    a2.set_xlabel("step")
    a2.set_ylabel("held-out embedding cosine to softmax")
    if curve.get("eval_masked_accuracy"):
        a3 = a2.twinx()
        a3.plot(curve["eval_steps"], curve["eval_masked_accuracy"], marker="s", color="tab:red", label="accuracy")
        if curve.get("softmax_masked_accuracy") is not None:
            a3.axhline(curve["softmax_masked_accuracy"], color="tab:red", ls="--")
        a3.set_ylabel("masked-residue accuracy (dashed: softmax)", color="tab:red")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _positions(model: nn.Module) -> int:
    """How many positions the model embeds (a large number if its config does not say)."""
    n = getattr(model.config, "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else 1 << 30


def fit_set(groups: list[list[dict]], count: int) -> list[dict]:
    """The first ``count`` batches taken in turn from each group (the short passages, then each
    packed length): adapters fitted on short passages only lose at 512 tokens and the reverse
    (benchmarks/results/hf_fidelity_512.md)."""
    out: list[dict] = []
    for i in range(max((len(g) for g in groups), default=0)):
        out += [g[i] for g in groups if i < len(g)]
    return out[:count]


def _last(curve: dict) -> str:
    return " ".join(f"{c[-1]:.4f}" for c in curve["eval_cosine"].values() if c)


def distill_encoder(
    teacher: nn.Module,
    tok,
    kind: str,
    config: EncoderDistillConfig,
    *,
    out: str | Path,
    name: str,
    echo: Callable[[str], None],
    on_step: Callable[[int, float, str], None] | None = None,
    on_eval: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Distill a performerized copy of ``teacher`` (a sentence encoder or a masked LM,
    ``kind`` as ``favor.hf.models.load_softmax`` says; ``name`` goes to the report) and save
    it to ``out`` with distill.json and distill.png; returns the report. The summary lines
    go to ``echo``; ``on_step(step, loss, cosines)`` and ``on_eval(cosines)`` follow the run
    (cosines: the last held-out cosine per length, as text). ValueError for options that do
    not fit the model or text, before anything is trained."""
    cfg = config
    mlm = kind == "masked-lm"
    settings = DistillConfig(
        steps=cfg.steps,
        max_seconds=60.0 * cfg.minutes,
        lr=cfg.lr,
        adapter_lr=cfg.adapter_lr,
        gain_lr=cfg.gain_lr,
        logit_weight=cfg.logit_weight,
        embedding_weight=cfg.embedding_weight,
        seed=cfg.seed,
        schedule=cfg.schedule,
        train=cfg.train,
        attention_weight=cfg.attention_weight,
    )
    if not mlm and cfg.corpus not in CORPORA:
        raise ValueError(f"corpus must be one of {sorted(CORPORA)}, got {cfg.corpus!r}")
    text, heldouts = ("train", ("heldout",)) if mlm else CORPORA[cfg.corpus]
    text, heldouts = cfg.text or text, list(cfg.heldout or heldouts)
    length = max_length(cfg.max_length, kind, 64)
    train = split_texts(text, kind)
    samples = cfg.samples or (64 if mlm else 32)
    held = split_texts(heldouts[0], kind, samples)
    if mlm:
        raw = [s.replace(" ", "") for s in train]
        batches = [
            {k: v[:, :length] for k, v in b.items() if k != "labels"}
            for seed in range(cfg.maskings)
            for b in masked_batches(tok, raw, seed=1000 + seed, batch_size=cfg.batch_size)
        ]
        mb = masked_batches(tok, [s.replace(" ", "") for s in held], seed=0)
    else:
        batches = tokenize_batches(tok, train, batch_size=cfg.batch_size, max_length=length)
    positions = _positions(teacher)
    long_lengths = cfg.long_lengths
    if long_lengths is None:
        long_lengths = [] if mlm else sorted({min(n, positions) for n in LONG_LENGTHS})
    long_lengths = [n for n in long_lengths if n]
    if long_lengths and mlm:
        raise ValueError("--long-length packs passages of a sentence encoder's text, not a masked LM's")
    tokens = cfg.long_batch_size * max(long_lengths, default=0)  # per packed batch, every length
    groups = [batches]
    for n in long_lengths:
        long = packed_documents(tok, [model_texts(d, kind) for d in builtin_documents(text, kind)], length=n)
        groups.append(tokenize_batches(tok, long, batch_size=max(1, tokens // n), max_length=n))
    batches = [b for group in groups for b in group]
    fit_batches = cfg.fit_batches or max(2, len(groups))  # one batch of each length
    fitting = fit_set(groups if cfg.fit_on == "mixed" else groups[:1], fit_batches)
    lengths = eval_lengths(cfg.eval_lengths, kind, max_length(None, kind, 128), limit=positions)
    evs, *others = [
        {n: held_out_batches(tok, h, kind, length=n, count=samples, batch_size=8) for n in lengths} for h in heldouts
    ]
    t0 = time.perf_counter()
    student = performerize(
        copy.deepcopy(teacher),
        kernel=cfg.kernel,
        num_features=cfg.num_features,
        seed=cfg.seed,
        calibration=batches[:2],
        **cfg.features,
    )
    if cfg.fit_steps:
        fit_adapters(student, fitting, steps=cfg.fit_steps, gain_lr=cfg.gain_lr)
    refs = {n: embeddings(teacher, ev, attn="sdpa") for n, ev in evs.items()}
    other_refs = [{n: embeddings(teacher, ev, attn="sdpa") for n, ev in o.items()} for o in others]
    other_zero_shot = [embedding_cosines(student, o, r) for o, r in zip(others, other_refs, strict=True)]
    keys = [str(n) for n in lengths]
    curve = {
        "loss": [],
        "eval_steps": [],
        "eval_lengths": lengths,
        "eval_cosine": {n: [] for n in keys},
        "eval_cosine_min": {n: [] for n in keys},
    }
    if mlm:
        curve["eval_masked_accuracy"] = []
        softmax_acc, n_masked = masked_accuracy(teacher, mb)
        curve["softmax_masked_accuracy"] = softmax_acc

    def evaluate(step: int) -> None:
        curve["eval_steps"].append(step)
        for n, ev in evs.items():
            cos = (embeddings(student, ev, attn=NAME) * refs[n]).sum(-1)
            curve["eval_cosine"][str(n)].append(float(cos.mean()))
            curve["eval_cosine_min"][str(n)].append(float(cos.min()))
        if mlm:
            curve["eval_masked_accuracy"].append(masked_accuracy(student, mb)[0])
        if on_eval is not None:
            on_eval(_last(curve))

    def step_done(step: int, loss: float) -> None:
        curve["loss"].append(loss)
        if on_step is not None:
            on_step(step, loss, _last(curve))

    distill(student, teacher, batches, settings, on_step=step_done, evaluate=evaluate, eval_every=cfg.eval_every)
    other_final = [embedding_cosines(student, o, r) for o, r in zip(others, other_refs, strict=True)]
    out = Path(out)
    save_pretrained(student, out)
    result = {
        "model": name,
        "corpus": None if mlm else cfg.corpus,
        "text": text,
        "held_out": heldouts[0],
        "kernel": cfg.kernel,
        "num_features": cfg.num_features,
        "steps": len(curve["loss"]),
        "fit_steps": cfg.fit_steps,
        "fit_batches": fit_batches,
        "fit_on": cfg.fit_on,
        "schedule": cfg.schedule,
        "train": cfg.train,
        "lr": cfg.lr,
        "adapter_lr": cfg.adapter_lr,
        "gain_lr": cfg.gain_lr,
        "logit_weight": cfg.logit_weight,
        "attention_weight": cfg.attention_weight,
        "embedding_weight": cfg.embedding_weight,
        **cfg.features,
        "max_length": length,
        "training_texts": len(train),
        "seconds": round(time.perf_counter() - t0, 1),
        "batch_size": cfg.batch_size,
        "long_length": max(long_lengths, default=0),
        "long_lengths": long_lengths,
        "long_batch_size": cfg.long_batch_size,
        "training_batches": len(batches),
        "held_out_passages": {n: sum(len(b["input_ids"]) for b in evs[int(n)]) for n in keys},
        "zero_shot_cosine": {n: c[0] for n, c in curve["eval_cosine"].items()},
        "final_cosine": {n: c[-1] for n, c in curve["eval_cosine"].items()},
        "final_cosine_min": {n: c[-1] for n, c in curve["eval_cosine_min"].items()},
        "other_held_out": {
            h: {
                "zero_shot_cosine": {n: c[0] for n, c in z.items()},
                "final_cosine": {n: c[0] for n, c in f.items()},
                "final_cosine_min": {n: c[1] for n, c in f.items()},
            }
            for h, z, f in zip(heldouts[1:], other_zero_shot, other_final, strict=True)
        },
        **(
            {
                "masked_residues": n_masked,
                "softmax_masked_accuracy": softmax_acc,
                "zero_shot_masked_accuracy": curve["eval_masked_accuracy"][0],
                "final_masked_accuracy": curve["eval_masked_accuracy"][-1],
            }
            if mlm
            else {}
        ),
        "curve": curve,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    (out / "distill.json").write_text(json.dumps(result, indent=2) + "\n")
    _plot(curve, out / "distill.png")
    for n in keys:
        echo(
            f"held-out ({heldouts[0]}) embedding cosine to softmax at {n} tokens: {result['zero_shot_cosine'][n]:.4f} "
            f"(zero-shot: calibrated{', fitted' if cfg.fit_steps else ''}) -> {result['final_cosine'][n]:.4f} after "
            f"{result['steps']} steps ({result['seconds']:.0f} s); min {result['final_cosine_min'][n]:.4f}"
        )
    for h, r in result["other_held_out"].items():
        for n in keys:
            echo(
                f"held-out ({h}) at {n} tokens: {r['zero_shot_cosine'][n]:.4f} (zero-shot) -> "
                f"{r['final_cosine'][n]:.4f}; min {r['final_cosine_min'][n]:.4f}"
            )
    if mlm:
        echo(
            f"held-out masked-residue accuracy ({n_masked} residues): softmax {softmax_acc:.4f}, zero-shot "
            f"{result['zero_shot_masked_accuracy']:.4f}, distilled {result['final_masked_accuracy']:.4f}"
        )
    echo(f"saved {out} (favor.hf.from_pretrained), {out / 'distill.json'}, {out / 'distill.png'}")
    return result
