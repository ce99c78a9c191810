"""Zero-shot fidelity of `favor distill`'s encoder start: the performerized, calibrated and
fitted student before any training step, on the recipe's own held-out texts.

Runs favor.hf.distill_encoder.distill_encoder with its training loop replaced by the step-0
evaluation, so the student, calibration, fit set and held-out passages are exactly the
recipe's. Prints the machine and settings; writes JSON (--json).

    python -m benchmarks.distill_zero_shot --exact-window 16 --exact-block 32 --json runs/z.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import torch


def main(argv: list[str] | None = None) -> int:
    from favor.hf import distill_encoder as de
    from favor.hf.models import load_softmax

    p = argparse.ArgumentParser()
    p.add_argument("--exact-window", type=int, default=8)
    p.add_argument("--exact-sinks", type=int, default=1)
    p.add_argument("--exact-block", type=int, default=32)
    p.add_argument("--fit-steps", type=int, default=40)
    p.add_argument("--num-features", type=int, default=256, help="random features M per head")
    p.add_argument("--gain-lr", type=float, help="the far gain's fitting rate (default: the adapters')")
    p.add_argument("--json")
    a = p.parse_args(argv)
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"load average {os.getloadavg()}")
    torch.manual_seed(0)
    model, tok, kind = load_softmax("minilm")
    features = {
        "projection": "orthogonal",
        "key_shift": "sequence",
        "exact_window": a.exact_window,
        "exact_sinks": a.exact_sinks,
        "exact_block": a.exact_block,
    }
    print(features, "fit_steps", a.fit_steps, "gain_lr", a.gain_lr, "num_features", a.num_features)

    def step0(student, teacher, batches, settings, *, on_step, evaluate, eval_every):
        evaluate(0)  # the zero-shot evaluation only: no training step
        return []

    de.distill = step0
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        r = de.distill_encoder(
            model,
            tok,
            kind,
            de.EncoderDistillConfig(
                fit_steps=a.fit_steps, gain_lr=a.gain_lr, num_features=a.num_features, features=features
            ),
            out=out,
            name="minilm",
            echo=print,
        )
    row = {
        **features,
        "fit_steps": a.fit_steps,
        "num_features": a.num_features,
        "gain_lr": a.gain_lr,
        "python_docs": r["zero_shot_cosine"],
        "python_docs_min": r["final_cosine_min"],
        "kjv_heldout": r["other_held_out"]["heldout"]["zero_shot_cosine"],
        "seconds": round(time.perf_counter() - t0, 1),
        "load_end": os.getloadavg(),
    }
    print(json.dumps(row))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(row, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
