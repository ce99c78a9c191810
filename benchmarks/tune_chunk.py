"""Chunk-size sweep for the fast paths (how the defaults were chosen): causal forward +
backward vs chunk size C and chunks per block (favor.ops.causal_fast.BLOCK_CHUNKS),
bidirectional forward vs chunk size; interleaved, median of 5. With ``--heads``:
bidirectional forward+backward vs chunk size for each number of heads (B=1), the sweep
behind ``bidirectional_fast.default_chunk``, which is marked in the output.

    python -m benchmarks.tune_chunk [--length 8192]
    python -m benchmarks.tune_chunk --length 16384 --heads 1,2,4,8,16
"""

from __future__ import annotations

import argparse
import statistics
import time

from ._common import header, write_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tune_chunk", description=__doc__)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--heads", default=None, help="comma-separated H: the bidirectional fwd+bwd sweep")
    args = parser.parse_args(argv)
    if args.heads:
        return _heads_sweep(args.length, [int(h) for h in args.heads.split(",")], args.repeats)
    import torch

    import favor
    from favor.benchmarking.timing import BenchConfig, bench_feature_map, bench_inputs

    info = header(f"tune_chunk: L={args.length} B=1 H=8 D=64 M=256 float32")
    cfg = BenchConfig()  # B=1, H=8, D=64, M=256, positive, float32
    fm = bench_feature_map(cfg)
    q, k, v = bench_inputs(args.length, cfg, grad=True)

    from favor.ops import causal_fast

    default_blocks = causal_fast.BLOCK_CHUNKS

    def causal(cb):
        causal_fast.BLOCK_CHUNKS = cb[1]
        try:
            out = favor.attention(q, k, v, fm, causal=True, chunk_size=cb[0])
            out.backward(torch.ones_like(out))
        finally:
            causal_fast.BLOCK_CHUNKS = default_blocks

    def bidir(c):
        with torch.no_grad():
            favor.attention(q, k, v, fm, chunk_size=c)

    cands = {f"causal fwd+bwd C={c} blocks of {b}": (causal, (c, b)) for c in (32, 64, 128) for b in (1, 2, 4, 8, 16)}
    cands |= {f"bidirectional fwd C={c}": (bidir, c) for c in (256, 512, 1024, 2048)}
    times = {n: [] for n in cands}
    for f, c in cands.values():
        f(c)
    for _ in range(args.repeats):
        for n, (f, c) in cands.items():
            t0 = time.perf_counter()
            f(c)
            times[n].append(time.perf_counter() - t0)
    rows = [{"name": n, "median_s": statistics.median(t)} for n, t in times.items()]
    for r in rows:
        print(f"{r['name']:>36}: {1e3 * r['median_s']:8.1f} ms")
    print(f"wrote {write_json('tune_chunk', {'machine': info, 'length': args.length, 'rows': rows})}")
    return 0


def _heads_sweep(length: int, heads: list[int], repeats: int) -> int:
    import torch

    import favor
    from favor.ops.bidirectional_fast import default_chunk

    info = header(f"tune_chunk --heads: bidirectional fwd+bwd, L={length} B=1 D=64 M=256 float32")
    fm = favor.FeatureMap("positive", dim=64, num_features=256, generator=torch.Generator().manual_seed(0))
    rows = []
    for h in heads:
        # q, k, v as strided views of one fused projection, as a model holds them
        qkv = torch.randn(1, length, 3, h, 64, generator=torch.Generator().manual_seed(h), requires_grad=True)
        chunks = sorted({512, 1024, 2048, 4096, default_chunk(h)})

        def step(c, qkv=qkv):
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            out = favor.attention(q, k, v, fm, chunk_size=c)
            out.backward(torch.ones_like(out))
            qkv.grad = None

        times = {c: [] for c in chunks}
        for c in chunks:
            step(c)
        for _ in range(repeats):
            for c in chunks:
                t0 = time.perf_counter()
                step(c)
                times[c].append(time.perf_counter() - t0)
        for c in chunks:
            row = {"heads": h, "chunk": c, "median_s": statistics.median(times[c]), "default": c == default_chunk(h)}
            rows.append(row)
            mark = "  <- default" if row["default"] else ""
            print(f"H={h:>3} C={c:>5}: {1e3 * row['median_s']:8.1f} ms{mark}")
    print(f"wrote {write_json('tune_chunk_heads', {'machine': info, 'length': length, 'rows': rows})}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
