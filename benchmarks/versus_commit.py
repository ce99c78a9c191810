"""This tree's favor against an earlier commit's, in one process, calls interleaved: how much
a change moved the fast paths (bidirectional forward and forward+backward, causal
forward+backward, one decoding step), for FAVOR+ and FAVOR++. CPU time of this process
(``time.process_time``), so another job on the other core moves both sides alike;
``--threads 1`` by default for the same reason.

    python -m benchmarks.versus_commit 289447c [--repeats 5] [--threads 1]

The earlier ``favor`` package is unpacked with ``git archive`` into a temporary folder and
imported as ``favor_<rev>`` (the attention core imports itself relatively).
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ._common import header, write_json

H, D, M = 8, 64, 256
CASES = [  # name, L, causal, backward
    ("bidirectional fwd", 16384, False, False),
    ("bidirectional fwd+bwd", 4096, False, True),
    ("causal fwd+bwd", 2048, True, True),
    ("causal fwd+bwd", 8192, True, True),
]


def load_commit(rev: str, into: Path):
    """The favor package of ``rev`` as module ``favor_<rev>``."""
    name = f"favor_{rev}".replace("-", "_").replace(".", "_")
    archive = subprocess.run(["git", "archive", rev, "favor"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    (into / "favor").rename(into / name)
    sys.path.insert(0, str(into))
    return importlib.import_module(name)


def _time(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.process_time()
        fn()
        out.append(time.process_time() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.versus_commit", description=__doc__)
    parser.add_argument("rev", help="the earlier commit")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import torch

    import favor

    torch.set_num_threads(args.threads)
    info = header(f"this tree vs {args.rev}: B=1 H={H} D={D} M={M} float32, CPU time, median of {args.repeats}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        old = load_commit(args.rev, Path(tmp))
        packages = {args.rev: old, "now": favor}
        for kernel in ("positive", "oprf"):
            fms = {
                n: p.FeatureMap(kernel, dim=D, num_features=M, generator=torch.Generator().manual_seed(1))
                for n, p in packages.items()
            }
            for name, length, causal, backward in CASES:
                gen = torch.Generator().manual_seed(0)
                q, k, v = (torch.randn(1, H, length, D, generator=gen).requires_grad_(backward) for _ in range(3))

                def call(n, q=q, k=k, v=v, causal=causal, backward=backward, fms=fms):
                    if backward:
                        packages[n].attention(q, k, v, fms[n], causal=causal).sum().backward()
                        q.grad = k.grad = v.grad = None
                    else:
                        with torch.no_grad():
                            packages[n].attention(q, k, v, fms[n], causal=causal)

                times = {n: [] for n in packages}
                for r in range(args.repeats + 1):  # the first round warms up
                    for n in packages:
                        t = _time(lambda n=n: call(n), 1)
                        if r:
                            times[n] += t
                rows.append(_row(kernel, f"{name} L={length}", times, args.rev))
            rows.append(_row(kernel, "step at context 1024", _steps(packages, fms, args.repeats), args.rev))
    write_json("versus_commit", {"machine": info, "rev": args.rev, "rows": rows})
    return 0


def _steps(packages, fms, repeats: int, tokens: int = 50) -> dict[str, list[float]]:
    import torch

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, 1024, D, generator=gen) for _ in range(3))
    x = torch.randn(tokens, 3, 1, H, D, generator=gen)
    times = {n: [] for n in packages}
    with torch.no_grad():
        start = {n: p.attention(q, k, v, fms[n], causal=True, return_state=True)[1] for n, p in packages.items()}
        for r in range(repeats + 1):
            for n, p in packages.items():

                def decode(n=n, p=p):
                    s = start[n]
                    for i in range(tokens):
                        _, s = p.step(s, x[i, 0], x[i, 1], x[i, 2], fms[n])

                t = _time(decode, 1)[0] / tokens
                if r:
                    times[n].append(t)
    return times


def _row(kernel: str, case: str, times: dict[str, list[float]], rev: str) -> dict:
    old, now = statistics.median(times[rev]), statistics.median(times["now"])
    print(f"{kernel:8s} {case:28s} {rev} {1e3 * old:8.2f} ms   now {1e3 * now:8.2f} ms   {old / now:.2f}x", flush=True)
    return {"kernel": kernel, "case": case, "before_s": old, "now_s": now, "speedup": old / now}


if __name__ == "__main__":
    raise SystemExit(main())
