"""What exact local terms (favor.hf.local) cost: bidirectional attention with the weights of
each query's 2W+1 neighbours and S sink tokens exact, against plain FAVOR (the fast path) and
SDPA, in the same run; contenders interleaved, median of --repeats.

    python -m benchmarks.local_terms [--window 4] [--sinks 1] [--lengths 1024 4096 16384]
"""

from __future__ import annotations

import argparse
import statistics
import time

from ._common import header, write_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.local_terms", description=__doc__)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--sinks", type=int, default=1)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backward", action="store_true", help="time forward+backward")
    parser.add_argument("--causal", action="store_true", help="causal attention (decoders)")
    args = parser.parse_args(argv)
    import torch
    import torch.nn.functional as F

    import favor
    from favor.hf.local import local_exact_attention, pair_features

    b, h, d, m = 1, 8, 64, 256
    mode = ("causal " if args.causal else "") + ("forward+backward" if args.backward else "forward")
    info = header(
        f"local terms: window={args.window} sinks={args.sinks}, B={b} H={h} D={d} M={m} float32, {mode}, "
        f"median of {args.repeats}"
    )
    fm = favor.FeatureMap("positive", dim=d, num_features=m, generator=torch.Generator().manual_seed(0))
    root = d**-0.25

    def local(q, k, v):
        fq, fk = pair_features(fm, q, k, root, causal=args.causal)
        return local_exact_attention(
            fq, fk, q * root, k * root, v, window=args.window, sinks=args.sinks, causal=args.causal
        )

    fns = {
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=args.causal),
        "favor": lambda q, k, v: favor.attention(q, k, v, fm, causal=args.causal),
        "favor+local": local,
    }
    rows = []
    for length in args.lengths:
        g = torch.Generator().manual_seed(length)
        q, k, v = (torch.randn(b, h, length, d, generator=g).requires_grad_(args.backward) for _ in range(3))

        def once(f, q=q, k=k, v=v):
            if args.backward:
                f(q, k, v).sum().backward()
                q.grad = k.grad = v.grad = None
            else:
                with torch.no_grad():
                    f(q, k, v)

        for f in fns.values():
            once(f)  # warm-up
        times = {n: [] for n in fns}
        for _ in range(args.repeats):
            for n, f in fns.items():
                t0 = time.perf_counter()
                once(f)
                times[n].append(time.perf_counter() - t0)
        med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
        row = {
            "length": length,
            **{f"{n}_ms": round(t, 2) for n, t in med.items()},
            "local_over_favor": round(med["favor+local"] / med["favor"], 2),
            "sdpa_over_local": round(med["sdpa"] / med["favor+local"], 2),
        }
        rows.append(row)
        print(
            f"L={length:>6}: sdpa {med['sdpa']:9.1f} ms  favor {med['favor']:8.1f} ms  favor+local "
            f"{med['favor+local']:8.1f} ms  (local/favor {row['local_over_favor']:.2f}x, "
            f"sdpa/local {row['sdpa_over_local']:.2f}x)"
        )
    path = write_json(
        f"local_terms_{'causal_' if args.causal else ''}{'fwd_bwd' if args.backward else 'fwd'}",
        {"machine": info, "args": vars(args), "rows": rows},
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
