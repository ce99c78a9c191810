"""The compiled decoding step (favor.ops.local.native) against fused_step's PyTorch ops, in
one model and one process: two FavorCaches of the same performerized SmolLM2 after the same
prompt, one made with the compiled step and one without, and the no-attention floor
(benchmarks.hf_generate.floor_model), taking their tokens round-robin (forwards, then
backwards) so that all three see the same machine load; median per token, and each
model's ratio to the floor as the median of its per-round ratios.

    python -m benchmarks.hf_decode_compiled [--variant tied|untied] [--contexts 200,600] [--tokens 40]

A context below W + S = 516 times the tokens before the ring is full (``_unwrapped``), one
above it the steady state. The model is hf_generate's ``--like-distilled`` stand-in
(calibrated, the e column nonzero: a distilled model's decode path), W=512, S=4, float32.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from ._common import header, write_json
from .hf_generate import _paired


@torch.no_grad()
def measure(performer, floor, contexts: list[int], tokens: int) -> list[dict]:
    import favor.hf as fh
    import favor.ops.local.fused as fused

    rows = []
    for context in contexts:
        g = torch.Generator().manual_seed(context)
        vocab = performer.config.vocab_size
        ids = torch.randint(0, vocab, (1, context), generator=g)
        nxt = torch.randint(0, vocab, (1, tokens + 2), generator=g)
        caches = {}
        saved = fused.NATIVE
        try:
            for name, compiled in (("ops", False), ("compiled", True)):
                fused.NATIVE = compiled  # read when a state first takes the fused step
                cache = fh.FavorCache(performer)
                performer(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
                for t in range(2):  # the prompt's first step, then the fused layout
                    performer(input_ids=nxt[:, t : t + 1], cache=cache, use_cache=True)
                caches[name] = cache
        finally:
            fused.NATIVE = saved
        times = {name: [] for name in ("floor", *caches)}
        for t in range(2, tokens + 2):
            tok = nxt[:, t : t + 1]
            order = list(times) if t % 2 == 0 else list(times)[::-1]
            for name in order:
                t0 = time.perf_counter()
                if name == "floor":
                    floor(input_ids=tok, use_cache=False)
                else:
                    performer(input_ids=tok, cache=caches[name], use_cache=True)
                times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(ts[2:]) for name, ts in times.items()}
        row = {"context": context, "tokens": tokens, **{f"{n}_token_s": v for n, v in med.items()}}
        # per-round ratios (hf_generate._paired: the machine's phases change between rounds)
        row.update({f"{n}_over_floor": _paired(times[n][2:], times["floor"][2:]) for n in caches})
        row.update({f"{n}_over_floor_of_medians": med[n] / med["floor"] for n in caches})
        row.update({f"{n}_token_all_s": ts for n, ts in times.items()})
        rows.append(row)
        print(
            f"context {context:>6}: floor {1e3 * med['floor']:.2f} ms, ops {1e3 * med['ops']:.2f} ms "
            f"({row['ops_over_floor']:.3f}x), compiled {1e3 * med['compiled']:.2f} ms ({row['compiled_over_floor']:.3f}x)",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    from favor.ops.local import native

    from .hf_generate import _models, floor_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=("tied", "untied"), default="tied")
    parser.add_argument("--contexts", default="200,600", help="comma-separated prompt lengths (default 200,600)")
    parser.add_argument("--tokens", type=int, default=40, help="new tokens per context and model (default 40)")
    parser.add_argument("--suffix", default="", help="appended to the JSON's name")
    args = parser.parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",")]
    info = header(f"hf_decode_compiled: smollm2 {args.variant}, W=512 S=4, float32, {args.tokens} tokens per context")
    if native.load() is None:
        parser.error("the compiled step did not build here (see the log): nothing to compare")
    softmax, performers = _models(
        max(contexts) + args.tokens + 8,
        exact_window=512,
        exact_sinks=4,
        model="smollm2",
        variants=(args.variant,),
        like_distilled=True,
    )
    rows = measure(performers[args.variant], floor_model(softmax), contexts, args.tokens)
    info["load_avg_end"] = list(os.getloadavg())
    path = write_json(f"hf_decode_compiled_{args.variant}{args.suffix}", {"machine": info, "rows": rows})
    print(f"load average at the end: {info['load_avg_end']}; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
