"""How much FAVOR's far-key estimate should weigh in zero-shot SmolLM2: held-out perplexity,
KL and top-1 agreement with softmax when every adapter's ``far_log_gain`` is g (the far keys'
estimate times exp(g); g = 0 is the unbiased estimator, g = -60 leaves the window and sinks
alone). The model is `favor distill`'s zero-shot start (derf, M=256, calibrated on two
1,024-token training passages, exact window ``--window`` + 4 sinks); the text is
favor.data.english's held-out Python docs. ~1 min per gain at 2,048 tokens x 2 on one quiet thread.

    python -m benchmarks.llm_far_gain_sweep [--gains 0,-0.5,-1,-2,-4,-60] [--window 256] [--length 2048]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from ._common import OUT, header


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.llm_far_gain_sweep", description=__doc__)
    parser.add_argument("--gains", default="0,-0.5,-1,-2,-4,-60")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--passages", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT / "llm_far_gain_sweep.json")
    args = parser.parse_args(argv)
    import favor.hf as fh
    from favor.data.english import passages
    from favor.data.models import load_causal_lm
    from favor.hf.evaluate import compare
    from favor.hf.linearize import train_batches

    info = header(f"llm_far_gain_sweep: SmolLM2, W={args.window}, {args.passages} x {args.length} held-out tokens")
    teacher, tokenizer = load_causal_lm("smollm2")[:2]
    ids = passages(tokenizer, "heldout", length=args.length, count=args.passages)
    calibration = train_batches(passages(tokenizer, "train", length=1024, count=2), 1)
    model = fh.performerize(
        copy.deepcopy(teacher), seed=0, calibration=calibration, exact_window=args.window, exact_sinks=4
    ).eval()
    adapters = [m for m in model.modules() if isinstance(m, fh.FavorAdapter)]
    result = {"machine": info, "window": args.window, "length": args.length, "gains": {}}
    for g in (float(x) for x in args.gains.split(",")):
        for adapter in adapters:
            adapter.far_log_gain.fill_(g)
        t = time.perf_counter()
        r = compare(teacher, model, ids)
        r["seconds"] = time.perf_counter() - t
        result["gains"][str(g)] = r
        print(
            f"gain {g:+.1f}: perplexity {r['perplexity']:.3f} ({r['perplexity'] / r['teacher_perplexity']:.3f}x), "
            f"KL {r['kl']:.4f}, top-1 {r['top1']:.4f}",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
