"""The crossover targets, measured tightly: favor vs SDPA at the lengths where they are close
(bidirectional forward at L=1024 and 2048; causal forward+backward at L=1024 and 2048), each
pair interleaved, 2 warm-ups and the median of 15, after the contenders' correctness checks.

    python -m benchmarks.crossovers [--kernel positive] [--repeats 15] [--device cuda]
"""

from __future__ import annotations

import argparse

from ._common import add_device, header, write_json

CASES = [  # favor contender, SDPA contender, L, backward
    ("favor", "sdpa", 1024, False),
    ("favor", "sdpa", 2048, False),
    ("favor-causal", "sdpa-causal", 1024, True),
    ("favor-causal", "sdpa-causal", 2048, True),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.crossovers", description=__doc__)
    parser.add_argument("--kernel", default="positive")
    parser.add_argument("--repeats", type=int, default=15)
    add_device(parser)
    args = parser.parse_args(argv)
    from favor.benchmarking.timing import BenchConfig, check_contender, time_contenders

    cfg = BenchConfig(kernel=args.kernel, device=args.device)
    info = header(f"crossovers: kernel={cfg.kernel} B=1 H=8 D=64 M=256 float32, median of {args.repeats}", cfg.device)
    for name in ("favor", "sdpa", "favor-causal", "sdpa-causal"):
        ok, detail = check_contender(name, cfg)
        if not ok:
            print(f"check {name} FAILED, nothing timed: {detail}")
            return 1
    rows = []
    for fav, exact, length, backward in CASES:
        t = time_contenders([fav, exact], length, cfg, backward=backward, repeats=args.repeats, warmup=2)
        mode = "forward+backward" if backward else "forward"
        ratio = t[exact] / t[fav]
        print(f"{fav} {mode} L={length}: {1e3 * t[fav]:.1f} ms, {exact} {1e3 * t[exact]:.1f} ms: {ratio:.2f}x")
        rows.append({"favor": fav, "mode": mode, "L": length, "favor_s": t[fav], "sdpa_s": t[exact], "speedup": ratio})
    print(f"wrote {write_json(f'crossovers_{cfg.kernel}', {'machine': info, 'rows': rows})}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
