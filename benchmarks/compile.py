"""Does torch.compile pay? favor's bidirectional forward and causal forward + backward,
eager vs torch.compile(favor.attention) (inductor), interleaved, median of 5, compile time
reported apart. favor never requires compile; this records whether it is worth it.

    python -m benchmarks.compile [--length 4096]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import favor
from favor.benchmarking.timing import BenchConfig, bench_feature_map, bench_inputs

from ._common import header, write_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compile", description=__doc__)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    info = header(f"compile: L={args.length} B=1 H=8 D=64 M=256 float32")
    cfg = BenchConfig()  # B=1, H=8, D=64, M=256, positive, float32
    fm = bench_feature_map(cfg)
    q, k, v = bench_inputs(args.length, cfg, grad=True)

    def bidir(fn):
        with torch.no_grad():
            return fn(q, k, v, fm)

    def causal(fn):
        out = fn(q, k, v, fm, causal=True)
        out.backward(torch.ones_like(out))

    eager = favor.attention

    compiled = torch.compile(eager, dynamic=False)
    result = {"machine": info, "length": args.length}
    for label, f in (("bidirectional fwd", bidir), ("causal fwd+bwd", causal)):
        t0 = time.perf_counter()
        try:
            f(compiled)
        except Exception as exc:  # compile is optional: record why it did not run
            result[label] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            print(f"{label}: torch.compile failed: {result[label]['error']}")
            continue
        compile_s = time.perf_counter() - t0
        f(eager)
        times = {"eager": [], "compiled": []}
        for _ in range(args.repeats):
            for name, fn in (("eager", eager), ("compiled", compiled)):
                t0 = time.perf_counter()
                f(fn)
                times[name].append(time.perf_counter() - t0)
        med = {n: statistics.median(t) for n, t in times.items()}
        result[label] = {"compile_s": compile_s, **{f"{n}_s": t for n, t in med.items()}}
        print(
            f"{label}: eager {1e3 * med['eager']:.1f} ms, compiled {1e3 * med['compiled']:.1f} ms "
            f"({med['eager'] / med['compiled']:.2f}x), first compiled call {compile_s:.1f} s"
        )
    print(f"wrote {write_json('compile', result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
