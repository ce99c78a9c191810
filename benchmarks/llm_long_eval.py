"""Held-out perplexity, KL and top-1 agreement of SmolLM2 at a long length (default 8,192
tokens): softmax, the zero-shot performerized model of `favor distill`'s first step
(calibrated on two 1,024-token training passages, the recipe's exact window and sinks
or --exact-window / --exact-sinks) and, if given,
a distilled directory. The held-out text is favor.data.english's Python docs (never trained
on). Slow: each model reads ``--passages`` x ``--length`` tokens (~8 min per model at 8,192
on one quiet thread).

    python -m benchmarks.llm_long_eval [--length 8192] [--passages 2] [--distilled DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from ._common import OUT, header


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.llm_long_eval", description=__doc__)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--passages", type=int, default=2)
    parser.add_argument("--exact-window", type=int, help="default: favor.hf.linearize.LinearizeConfig's")
    parser.add_argument("--exact-sinks", type=int, help="default: favor.hf.linearize.LinearizeConfig's")
    parser.add_argument("--distilled", help="a directory written by `favor distill --model smollm2`")
    parser.add_argument("--out", type=Path, default=OUT / "llm_long_eval.json")
    args = parser.parse_args(argv)
    import favor.hf as fh
    from favor.data.english import passages
    from favor.data.models import load_causal_lm
    from favor.hf.evaluate import compare
    from favor.hf.linearize import LinearizeConfig, train_batches

    info = header(f"llm_long_eval: SmolLM2, {args.passages} x {args.length} held-out tokens")
    t0 = time.perf_counter()
    teacher, tokenizer = load_causal_lm("smollm2")[:2]
    ids = passages(tokenizer, "heldout", length=args.length, count=args.passages)
    calibration = train_batches(passages(tokenizer, "train", length=1024, count=2), 1)
    recipe = LinearizeConfig()
    window = recipe.exact_window if args.exact_window is None else args.exact_window
    sinks = recipe.exact_sinks if args.exact_sinks is None else args.exact_sinks
    zero_shot = fh.performerize(
        copy.deepcopy(teacher),
        kernel=recipe.kernel,
        num_features=recipe.num_features,
        seed=0,
        calibration=calibration,
        exact_window=window,
        exact_sinks=sinks,
    ).eval()
    result = {"machine": info, "length": args.length, "passages": int(ids.shape[0])}
    result.update(exact_window=window, exact_sinks=sinks)
    t = time.perf_counter()
    result["zero_shot"] = compare(teacher, zero_shot, ids)
    result["zero_shot_s"] = time.perf_counter() - t
    del zero_shot
    if args.distilled:
        student = fh.from_pretrained(args.distilled).eval()
        t = time.perf_counter()
        result["distilled"] = compare(teacher, student, ids)
        result["distilled_s"] = time.perf_counter() - t
    result["wall_s"] = time.perf_counter() - t0
    for name in ("zero_shot", "distilled"):
        if name in result:
            r = result[name]
            print(
                f"{name}: perplexity {r['perplexity']:.2f} ({r['perplexity'] / r['teacher_perplexity']:.2f}x softmax's "
                f"{r['teacher_perplexity']:.2f}), KL {r['kl']:.3f}, top-1 {r['top1']:.3f}"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
