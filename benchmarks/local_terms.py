"""What exact local terms (favor.ops.local) cost: bidirectional attention with the weights of
each query's 2W+1 neighbours and S sink tokens exact, against plain FAVOR (the fast path) and
SDPA, in the same run; contenders interleaved, median of --repeats.

With --block C > 1 (the CLI's default, 32) each query's whole block of C positions widened
by W either side is exact (favor.ops.local.block): local_fast with ``exact_block``, checked
against local_block's autograd path.

"favor+local" is the path favor.hf runs: favor.ops.local.bidirectional_fast (hand-written backward) for
bidirectional attention, the autograd path of favor.ops.local for --causal; --autograd adds
the autograd path for bidirectional attention too ("favor+local autograd", its reference).
Before timing, the fast path is checked against the autograd path (float64, outputs and
gradients); the script refuses to time it if they differ.

    python -m benchmarks.local_terms [--window 8] [--sinks 1] [--lengths 1024 4096 16384] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

from ._common import header, write_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.local_terms", description=__doc__)
    parser.add_argument("--window", type=int, default=8, help="exact neighbours either side (default 8: the CLI's)")
    parser.add_argument("--sinks", type=int, default=1)
    parser.add_argument(
        "--block", type=int, default=32, help="exact blocks of C positions (default 32: the CLI's; 1: the window alone)"
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backward", action="store_true", help="time forward+backward")
    parser.add_argument("--causal", action="store_true", help="causal attention (decoders)")
    parser.add_argument("--autograd", action="store_true", help="also time the autograd path (bidirectional)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall time, or this process's CPU time (with --threads 1: robust on a machine shared with other jobs)",
    )
    args = parser.parse_args(argv)
    import torch
    import torch.nn.functional as F

    import favor
    from favor.ops.local.bidirectional_fast import local_fast
    from favor.ops.local.block import block_exact_attention
    from favor.ops.local.window import local_exact_attention, pair_features

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and torch.get_num_threads() != 1:
        parser.error("--clock cpu sums the CPU time of all threads: use it with --threads 1")

    b, h, d, m = 1, 8, 64, 256
    mode = ("causal " if args.causal else "") + ("forward+backward" if args.backward else "forward")
    info = header(
        f"local terms: window={args.window} sinks={args.sinks} block={args.block}, B={b} H={h} D={d} M={m} float32, {mode}, "
        f"median of {args.repeats}, {args.clock} clock"
    )
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    fm = favor.FeatureMap("positive", dim=d, num_features=m, generator=torch.Generator().manual_seed(0))
    root = d**-0.25

    blocks = args.block > 1
    if blocks and args.causal:
        parser.error("--block is for bidirectional attention: use --block 1 with --causal")

    def autograd_path(q, k, v, fm=fm):
        fq, fk = pair_features(fm, q, k, root, causal=args.causal)
        if blocks:
            return block_exact_attention(
                fq, fk, q * root, k * root, v, window=args.window, sinks=args.sinks, block=args.block
            )
        return local_exact_attention(
            fq, fk, q * root, k * root, v, window=args.window, sinks=args.sinks, causal=args.causal
        )

    def fast_path(q, k, v, fm=fm):
        return local_fast(
            fm, q, k, q * root, k * root, v, root=root, window=args.window, sinks=args.sinks, exact_block=args.block
        )

    if not args.causal:
        _check(fast_path, autograd_path, fm, d)
    fns = {
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=args.causal),
        "favor": lambda q, k, v: favor.attention(q, k, v, fm, causal=args.causal),
        "favor+local": autograd_path if args.causal else fast_path,
    }
    if args.autograd and not args.causal:
        fns["favor+local autograd"] = autograd_path
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
                t0 = clock()
                once(f)
                times[n].append(clock() - t0)
        med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
        row = {
            "length": length,
            **{f"{n}_ms": round(t, 2) for n, t in med.items()},
            "local_over_favor": round(med["favor+local"] / med["favor"], 2),
            "sdpa_over_local": round(med["sdpa"] / med["favor+local"], 2),
        }
        if "favor+local autograd" in med:
            row["autograd_over_local"] = round(med["favor+local autograd"] / med["favor+local"], 2)
        rows.append(row)
        extra = f", autograd path {med['favor+local autograd']:.1f} ms" if "favor+local autograd" in med else ""
        print(
            f"L={length:>6}: sdpa {med['sdpa']:9.1f} ms  favor {med['favor']:8.1f} ms  favor+local "
            f"{med['favor+local']:8.1f} ms  (local/favor {row['local_over_favor']:.2f}x, "
            f"sdpa/local {row['sdpa_over_local']:.2f}x{extra})"
        )
    path = write_json(
        f"local_terms_{'causal_' if args.causal else ''}{f'block{args.block}_' if blocks else ''}"
        f"{'fwd_bwd' if args.backward else 'fwd'}",
        {"machine": info, "args": vars(args), "rows": rows},
    )
    print(f"wrote {path}")
    return 0


def _check(fast_path, autograd_path, fm, d: int) -> None:
    """The fast path against the autograd one in float64 (L=300: several blocks, a ragged
    last one), outputs and gradients; SystemExit if they differ."""
    import torch

    g = torch.Generator().manual_seed(1)
    fm64 = copy.deepcopy(fm).double()
    q, k, v = (torch.randn(1, 2, 300, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    outs = [f(q, k, v, fm=fm64) for f in (fast_path, autograd_path)]
    w = torch.randn(outs[0].shape, generator=g, dtype=torch.float64)
    grads = [torch.autograd.grad((o * w).sum(), (q, k, v)) for o in outs]
    for a, b in zip([outs[0], *grads[0]], [outs[1], *grads[1]], strict=True):
        if not torch.allclose(a, b, rtol=1e-9, atol=1e-11):
            raise SystemExit(
                f"local_fast differs from the autograd path by {float((a - b).abs().max()):.3g}: not timed"
            )
    print("check: local_fast == autograd path (float64, L=300, outputs and gradients, 1e-9)")


if __name__ == "__main__":
    raise SystemExit(main())
