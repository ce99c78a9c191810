"""Time and peak memory vs L: favor bidirectional / causal vs SDPA and performer-pytorch.

    python -m benchmarks.speed            # full: L = 256 ... 65536, median of 5
    python -m benchmarks.speed --quick    # the `favor bench --quick` grid

Same code as `favor bench`; writes runs/bench/bench.json and bench.png.
"""

from __future__ import annotations

import argparse

from . import _common  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    from favor.commands import bench

    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__)
    bench.add_arguments(parser)
    return bench.run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
