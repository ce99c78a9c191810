"""What exact local terms cost in favor.attention, against plain FAVOR and SDPA, with the
exact-terms issue's targets printed PASS/FAIL (B=1, H=8, D=64, M=256, float32):

* causal forward+backward, W=64, S=4: <= 1.5x plain causal FAVOR at 4,096 and 16,384, and
  >= 4x faster than causal SDPA at 16,384;
* bidirectional forward, blocks of 32, W=8, S=1: <= 2x plain FAVOR, >= 3x faster than SDPA
  at 4,096;
* peak memory of causal forward+backward at 65,536: <= 1.2x plain causal FAVOR's (fresh
  process each);
* decoding one token: <= 1.3x plain favor.step, flat (<= 1.2x) from 1k to 64k context.

Each contender is checked against its reference first (benchmarking.timing.check_contender).
``python -m benchmarks.exact_terms [--quick] [--threads N] [--repeats N] [--only causal ...]``;
JSON in runs/bench/exact_terms.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

from ._common import header, write_json


def _decode(context: int, exact, cfg, steps: int = 40) -> float:
    """Median seconds of one favor.step after ``context`` tokens (the state from a prefill)."""
    import torch

    import favor
    from favor.benchmarking.timing import bench_feature_map, bench_inputs

    fm = bench_feature_map(cfg)
    q, k, v = bench_inputs(context, cfg, grad=False)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    new = torch.randn(steps + 1, 3, cfg.batch, cfg.heads, cfg.dim, generator=gen)
    with torch.no_grad():
        _, state = favor.attention(q, k, v, fm, causal=True, return_state=True, exact=exact)
        times = []
        for i in range(steps + 1):
            t0 = time.perf_counter()
            _, state = favor.step(state, new[i, 0], new[i, 1], new[i, 2], fm, exact=exact)
            if i:  # the first is a warm-up
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    import torch

    import favor
    from favor.benchmarking.timing import BenchConfig, check_contender, peak_memory_mib, time_contenders

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short lengths (1024, 2048), no 65k memory run")
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (tests): tiny lengths, 1 repeat")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--only",
        choices=("causal", "bidirectional", "memory", "decode"),
        action="append",
        help="run only these parts (repeatable; default all)",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = BenchConfig()
    info = header("B=1, H=8, D=64, M=256, float32; causal W=64 S=4, bidirectional C=32 W=8 S=1")
    for name in ("favor-causal", "favor-exact-causal", "sdpa-causal", "favor", "favor-exact", "sdpa"):
        ok, why = check_contender(name, cfg)
        print(f"check {name}: {'ok' if ok else 'FAILED'} ({why})")
        if not ok:
            return 1
    if args.tiny:
        args.quick, args.repeats = True, 1
    lengths = (256, 512) if args.tiny else (1024, 2048) if args.quick else (4096, 16384)
    rows, results = [], {"machine": info, "causal": {}, "bidirectional": {}, "memory": {}, "decode": {}}

    def target(what: str, value: float, bound: float, *, at_most: bool = True, unit: str = "x") -> None:
        ok = value <= bound if at_most else value >= bound
        rows.append(
            (what, f"{value:.2f}{unit}", f"{'<=' if at_most else '>='} {bound}{unit}", "PASS" if ok else "FAIL")
        )

    parts = set(args.only or ("causal", "bidirectional", "memory", "decode"))
    for length in lengths if "causal" in parts else ():
        t = time_contenders(
            ["favor-causal", "favor-exact-causal", "sdpa-causal"], length, cfg, backward=True, repeats=args.repeats
        )
        results["causal"][length] = t
        print(f"causal fwd+bwd L={length}: " + ", ".join(f"{n} {s * 1e3:.0f} ms" for n, s in t.items()))
        target(f"causal fwd+bwd L={length}: exact / plain FAVOR", t["favor-exact-causal"] / t["favor-causal"], 1.5)
        if length == lengths[-1]:
            target(
                f"causal fwd+bwd L={length}: SDPA / exact",
                t["sdpa-causal"] / t["favor-exact-causal"],
                4.0,
                at_most=False,
            )
    length = lengths[0]
    if "bidirectional" in parts:
        t = time_contenders(["favor", "favor-exact", "sdpa"], length, cfg, backward=False, repeats=args.repeats * 2)
        results["bidirectional"][length] = t
        print(f"bidirectional fwd L={length}: " + ", ".join(f"{n} {s * 1e3:.0f} ms" for n, s in t.items()))
        target(f"bidirectional fwd L={length}: exact / plain FAVOR", t["favor-exact"] / t["favor"], 2.0)
        target(f"bidirectional fwd L={length}: SDPA / exact", t["sdpa"] / t["favor-exact"], 3.0, at_most=False)
    if not args.quick and "memory" in parts:
        mem = {n: peak_memory_mib(n, 65536, cfg, backward=True)[0] for n in ("favor-causal", "favor-exact-causal")}
        results["memory"][65536] = mem
        print("peak MiB fwd+bwd L=65536: " + ", ".join(f"{n} {m:.0f}" for n, m in mem.items()))
        target("peak memory L=65536: exact / plain", mem["favor-exact-causal"] / mem["favor-causal"], 1.2)
    contexts = (128, 512) if args.tiny else (1024, 4096) if args.quick else (1024, 65536)
    exact = favor.ExactTerms(64, 4, 1)
    for c in contexts if "decode" in parts else ():
        plain, ex = _decode(c, None, cfg), _decode(c, exact, cfg)
        results["decode"][c] = {"plain_s": plain, "exact_s": ex}
        print(f"decode one token after {c}: plain {plain * 1e6:.0f} us, exact {ex * 1e6:.0f} us")
        target(f"decode after {c}: exact / plain step", ex / plain, 1.3)
    d = results["decode"]
    if d:
        target(
            f"decode flatness: exact at {contexts[-1]} / {contexts[0]}",
            d[contexts[-1]]["exact_s"] / d[contexts[0]]["exact_s"],
            1.2,
        )
    print()
    width = max(len(r[0]) for r in rows)
    for what, value, bound, verdict in rows:
        print(f"{what:<{width}}  {value:>8}  {bound:>10}  {verdict}")
    results["targets"] = rows
    print(f"JSON: {write_json('exact_terms', results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
