"""Markdown table (for the README) from a `favor bench` JSON: time, peak memory and the
ratio to exact attention per length, one column group per contender.

    python -m benchmarks.table runs/bench/bench.json
"""

from __future__ import annotations

import json
import sys


def table(report: dict, mode: str, names: list[str]) -> str:
    rows = {(r["contender"], r["L"]): r for r in report["rows"] if r["mode"] == mode}
    lengths = sorted({n for (_, n) in rows})
    head = "| L | " + " | ".join(f"{n} ms | {n} MiB" for n in names) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(names))]
    for length in lengths:
        cells = []
        for n in names:
            r = rows.get((n, length))
            if r is None or r["time_s"] is None:
                cells += ["-", "-"]
                continue
            cells += [f"{1e3 * r['time_s']:.0f}", "-" if r["mem_mib"] is None else f"{r['mem_mib']:.0f}"]
        lines.append(f"| {length} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    report = json.loads(open(argv[0] if argv else "runs/bench/bench.json").read())
    bi = ["favor", "sdpa", "performer-pytorch"]
    causal = ["favor-causal", "sdpa-causal", "performer-pytorch-causal"]
    for mode, label in (("fwd", "forward"), ("fwdbwd", "forward + backward")):
        for names in (bi, causal):
            print(f"\n{label}:\n")
            print(table(report, mode, names))
    print(f"\nmatmul GFLOP/s in the same run: {report['matmul_gflops']:.1f}; crossovers: {report['crossovers']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
