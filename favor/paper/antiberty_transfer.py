"""Transfer for a real pretrained model: AntiBERTy performerized, then fine-tuned.

AntiBERTy (PyPI ``antiberty==0.1.3``, a BERT masked LM of antibody sequences) gets plain
FAVOR+ attention by ``favor.hf.performerize`` (positive features, no calibration, no
distillation) and is fine-tuned on its own masked-residue loss over the training V regions
shipped with favor (``favor.hf.antibodies``); masked accuracy on the held-out V regions is
tracked against the softmax model's. ``favor distill`` is the distillation route.
"""

from __future__ import annotations

import copy
import importlib.util
import time
from typing import Any

import torch

__all__ = ["antiberty_available", "antiberty_transfer"]


def antiberty_available() -> bool:
    return importlib.util.find_spec("antiberty") is not None


def antiberty_transfer(
    *,
    steps: int,
    eval_every: int,
    lr: float = 5e-5,
    batch_size: int = 8,
    num_features: int = 256,
    seed: int = 0,
    progress=None,
) -> dict[str, Any]:
    """{"softmax_accuracy", "curve": [{step, time, accuracy}], "steps_to_99pct", config}."""
    from ..hf import performerize
    from ..hf.antibodies import load_antibodies, masked_accuracy, masked_batches
    from ..hf.models import load

    base, tok, _ = load("antiberty")
    train, held = load_antibodies("train"), load_antibodies("heldout")
    evals = masked_batches(tok, held, seed=0)
    softmax_acc, n_masked = masked_accuracy(base, evals)
    torch.manual_seed(seed)
    model = performerize(copy.deepcopy(base), kernel="positive", plain=True, num_features=num_features, seed=seed)
    model.eval()
    curve = [{"step": 0, "time": 0.0, "accuracy": masked_accuracy(model, evals)[0]}]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    clock = 0.0
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        model.train()
        gen = torch.Generator().manual_seed(seed * 100_003 + step)
        pick = torch.randperm(len(train), generator=gen)[:batch_size].tolist()
        batch = masked_batches(tok, [train[i] for i in pick], seed=seed * 100_003 + step, batch_size=batch_size)[0]
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        clock += time.perf_counter() - t0
        if step % eval_every == 0 or step == steps:
            model.eval()
            curve.append(
                {"step": step, "time": clock, "accuracy": masked_accuracy(model, evals)[0], "train_loss": loss.item()}
            )
        if progress is not None:
            progress(1)
    target = 0.99 * softmax_acc
    return {
        "softmax_accuracy": softmax_acc,
        "masked_residues": n_masked,
        "curve": curve,
        "steps_to_99pct": next((p["step"] for p in curve if p["accuracy"] >= target), None),
        "config": {
            "steps": steps,
            "lr": lr,
            "batch": batch_size,
            "num_features": num_features,
            "kernel": "positive",
            "train_sequences": len(train),
            "heldout_sequences": len(held),
        },
    }
