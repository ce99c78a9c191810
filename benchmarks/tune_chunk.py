"""Chunk-size sweep for the fast paths (how the defaults were chosen): causal forward +
backward vs chunk size C and chunks per block (favor.attention.causal_fast.BLOCK_CHUNKS),
bidirectional forward vs chunk size; interleaved, median of 5.

    python -m benchmarks.tune_chunk [--length 8192]
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
    args = parser.parse_args(argv)
    import torch

    import favor
    from favor.benchmarking.timing import BenchConfig, bench_feature_map, bench_inputs

    info = header(f"tune_chunk: L={args.length} B=1 H=8 D=64 M=256 float32")
    cfg = BenchConfig()  # B=1, H=8, D=64, M=256, positive, float32
    fm = bench_feature_map(cfg)
    q, k, v = bench_inputs(args.length, cfg, grad=True)

    from favor.attention import causal_fast

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


if __name__ == "__main__":
    raise SystemExit(main())
