"""favor bench: time and peak memory vs sequence length, favor against exact attention
(scaled_dot_product_attention) and performer-pytorch when installed; decoding latency.

Prints the machine, a table and the ratios; writes bench.json and bench.png (log-log time
and memory vs L, crossover marked) under --out. ``--quick`` stays under 2 minutes on a
2-core CPU. This module parses the options and calls ``favor.benchmarking.speed.bench_report``
(the measurement code is favor.benchmarking.timing, also behind ``favor demo``'s speed table).
On a machine shared with other jobs run it with OMP_WAIT_POLICY=PASSIVE: spinning OpenMP
threads whose sibling core is busy slow 2-thread matmuls many times over.
"""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from ..benchmarking.speed import MODES, bench_report
from ..benchmarking.timing import BenchConfig

__all__ = ["add_arguments", "run"]


def add_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true", help="three lengths, 3 repeats: under 2 minutes")
    parser.add_argument("--out", default="runs/bench", help="output folder for bench.json and bench.png")
    parser.add_argument("--lengths", default=None, help="comma-separated sequence lengths")
    parser.add_argument("--kernel", default="positive", help="favor kernel (positive, oprf, ...)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per configuration (median)")
    parser.add_argument("--max-seconds", type=float, default=None, help="skip a configuration predicted to take longer")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--decode-contexts", default="1024,65536", help="context lengths for per-token decoding")
    parser.add_argument("--device", default="cpu", help="torch device to measure on (cpu, cuda, cuda:1)")


def run(args) -> int:
    cfg = BenchConfig(kernel=args.kernel, device=args.device)
    if args.lengths:
        lengths = [int(x) for x in args.lengths.split(",")]
    else:
        lengths = [1024, 2048, 4096] if args.quick else [256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
    bar = tqdm(total=len(lengths) * len(MODES), desc="bench", unit="cfg")
    bench_report(
        lengths,
        cfg=cfg,
        repeats=args.repeats or (3 if args.quick else 5),
        max_seconds=args.max_seconds or (12.0 if args.quick else 150.0),
        memory=not args.no_memory,
        quick=args.quick,
        decode_contexts=[int(x) for x in args.decode_contexts.split(",") if x],
        out=Path(args.out),
        echo=print,
        progress=lambda *_: bar.update(),
    )
    bar.close()
    return 0
