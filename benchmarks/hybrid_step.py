"""Seconds per training step of `favor train --preset text`'s model (dim 128, 3 layers, 4 heads
of 32, bytes): exact softmax (SDPA), plain FAVOR+ and the hybrid Performer (FAVOR+ with exact
window W and sinks S, ``favor.ExactTerms``), contenders interleaved round by round so that a
shared machine's load falls on all of them alike; median of ``--repeats`` rounds after one
warm-up round, one thread. The clock is this process's CPU time (``time.process_time``;
``--clock wall`` for wall time): on the shared 2-core machine, preemption by other jobs
moved wall times of the same step by 2-5x.

    python -m benchmarks.hybrid_step [--contexts 1024,4096] [--tokens 4096] [--repeats 3] [--only NAMES]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from ._common import header

EXACT = {"W=64 S=4": (64, 4), "W=16 S=1": (16, 1)}
#: fewer random features beside the window: the exact terms carry the sharp attention, the
#: features only the far keys (M = 2D and 4D for the text preset's heads of D = 32)
FEATURES = {"W=64 S=4 M=64": (64, 4, 64), "W=64 S=4 M=128": (64, 4, 128)}
#: the learnable per-head far gain (PerformerConfig.far_gain, initialised to -4, books' choice)
GAINS = {"W=64 S=4 gain": (64, 4, -4.0)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hybrid_step", description=__doc__)
    parser.add_argument("--contexts", default="1024,4096")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per step (batch = tokens / context)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--out", default=None, help="JSON file to write")
    parser.add_argument(
        "--encoder", action="store_true", help="bidirectional PerformerEncoder (books' masked LM) instead of the LM"
    )
    parser.add_argument("--only", default=None, help="comma-separated contenders to time beside softmax (default: all)")
    args = parser.parse_args(argv)
    import torch
    import torch.nn.functional as F

    from favor import ExactTerms
    from favor.models import PerformerConfig, PerformerEncoder, PerformerLM

    torch.set_num_threads(1)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    info = header("training step time: softmax vs FAVOR+ vs hybrid (text preset model)")
    rows = []
    for length in (int(x) for x in args.contexts.split(",")):
        batch = max(1, args.tokens // length)
        base = PerformerConfig(vocab_size=256, dim=128, depth=3, heads=4, max_len=length)
        cfgs = {"softmax": base.replace(attention="softmax"), "FAVOR+": base}
        cfgs.update({f"hybrid {k}": base.replace(exact=ExactTerms(w, sinks=s)) for k, (w, s) in EXACT.items()})
        cfgs.update(
            {
                f"hybrid {k}": base.replace(exact=ExactTerms(w, sinks=s), num_features=m)
                for k, (w, s, m) in FEATURES.items()
            }
        )
        cfgs.update(
            {f"hybrid {k}": base.replace(exact=ExactTerms(w, sinks=s), far_gain=g) for k, (w, s, g) in GAINS.items()}
        )
        if args.only:
            cfgs = {n: c for n, c in cfgs.items() if n == "softmax" or n in args.only.split(",")}
        build = PerformerEncoder if args.encoder else PerformerLM
        models = {n: build(c) for n, c in cfgs.items()}
        x = torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(0))
        times: dict[str, list[float]] = {n: [] for n in models}
        for r in range(args.repeats + 1):
            for n, m in models.items():
                t = clock()
                logits = m.logits(m(x)) if args.encoder else m(x)
                F.cross_entropy(logits.flatten(0, 1), x.flatten()).backward()
                if r:
                    times[n].append(clock() - t)
        soft = statistics.median(times["softmax"])
        for n, v in times.items():
            med = statistics.median(v)
            rows.append({"context": length, "batch": batch, "model": n, "s_per_step": med, "vs_softmax": med / soft})
            print(f"L={length:6d} B={batch} {n:16s} {med:.3f} s/step  {med / soft:.2f}x softmax")
    if args.out:
        payload = {
            "machine": info,
            "clock": args.clock,
            "tokens_per_step": args.tokens,
            "model": "PerformerEncoder" if args.encoder else "PerformerLM",
            "rows": rows,
        }
        Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
