"""The issue's targets, measured in one run (B=1, H=8, D=64, M=256, float32): bidirectional
forward and causal forward + backward at L=16384 against SDPA and performer-pytorch
(interleaved, 1 warm-up + median of --repeats; causal also against performer-pytorch with
the fast-transformers CPU kernel once benchmarks/fast_transformers_cpu.py has installed
it), the matmul GFLOP/s in the same run, peak
memory of forward + backward at L=65536 (fresh process each), decoding latency at context
1024 vs 65536 and vs SDPA with a KV cache.

    python -m benchmarks.targets [--kernel positive] [--repeats 5]
"""

from __future__ import annotations

import argparse

from ._common import add_device, header, write_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.targets", description=__doc__)
    parser.add_argument("--kernel", default="positive")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--memory-length", type=int, default=65536)
    add_device(parser)
    args = parser.parse_args(argv)
    from favor.benchmarking.timing import (
        CONTENDERS,
        BenchConfig,
        check_contender,
        decode_flatness,
        decode_latency,
        flops,
        matmul_fraction,
        matmul_gflops,
        peak_memory_mib,
        time_contenders,
    )

    cfg = BenchConfig(kernel=args.kernel, device=args.device)
    info = header(f"targets: kernel={cfg.kernel} B=1 H=8 D=64 M=256 float32, median of {args.repeats}", cfg.device)
    res: dict = {"machine": info, "kernel": cfg.kernel}
    names = [n for n, c in CONTENDERS.items() if c.available()]
    for n in list(names):
        ok, detail = check_contender(n, cfg)
        print(f"check {n}: {'ok' if ok else 'FAILED (not timed)'} - {detail}")
        if not ok:
            names.remove(n)
    gf0 = matmul_gflops(device=cfg.device)
    bi = [n for n in ("favor", "sdpa", "performer-pytorch") if n in names]
    t_bi = time_contenders(bi, args.length, cfg, backward=False, repeats=args.repeats)
    gf1 = matmul_gflops(device=cfg.device)
    causal = [n for n in ("favor-causal", "sdpa-causal", "performer-pytorch-causal-ft") if n in names]
    t_c = time_contenders(causal, args.length, cfg, backward=True, repeats=args.repeats)
    gf = (gf0 + gf1) / 2
    fav = flops("favor", args.length, cfg) / t_bi["favor"] / 1e9
    res["bidirectional_fwd_s"] = t_bi
    res["causal_fwdbwd_s"] = t_c
    res["matmul_gflops"] = [gf0, gf1]
    res["favor_fwd_gflops"] = fav
    print(f"\nL={args.length} bidirectional forward (ms): " + ", ".join(f"{n} {1e3 * t:.0f}" for n, t in t_bi.items()))
    print(f"  favor vs SDPA {t_bi['sdpa'] / t_bi['favor']:.1f}x", end="")
    if "performer-pytorch" in t_bi:
        print(f", vs performer-pytorch {t_bi['performer-pytorch'] / t_bi['favor']:.2f}x", end="")
    print(
        f"; favor {fav:.1f} GFLOP/s = {100 * fav / gf:.0f}% of matmul {gf:.1f} GFLOP/s (before {gf0:.1f}, after {gf1:.1f})"
    )
    frac = matmul_fraction(args.length, cfg, repeats=7)
    res["matmul_fraction"] = frac
    print(
        f"  favor and a 2048^3 GEMM alternated, medians of 7: {frac['favor_gflops']:.1f} of "
        f"{frac['matmul_gflops']:.1f} GFLOP/s = {100 * frac['fraction']:.0f}% of matmul"
    )
    print(f"L={args.length} causal forward+backward (ms): " + ", ".join(f"{n} {1e3 * t:.0f}" for n, t in t_c.items()))
    print(f"  favor vs causal SDPA {t_c['sdpa-causal'] / t_c['favor-causal']:.1f}x", end="")
    if "performer-pytorch-causal-ft" in t_c:
        ratio = t_c["performer-pytorch-causal-ft"] / t_c["favor-causal"]
        print(f", vs performer-pytorch with the fast-transformers CPU kernel {ratio:.2f}x", end="")
    print()
    mem = {}
    for n in ("favor", "favor-causal"):
        mem[n] = peak_memory_mib(n, args.memory_length, cfg, backward=True)
        print(f"L={args.memory_length} {n} forward+backward peak: {mem[n][0]:.0f} MiB ({mem[n][1]:.1f} s cold run)")
    res["memory_fwdbwd_mib"] = {n: m[0] for n, m in mem.items()}
    dec = [decode_latency(c, cfg, steps=100) for c in (1024, 65536)]
    res["decode"] = dec
    print(
        f"decoding us/token: favor {1e6 * dec[0]['favor_step_s']:.0f} at 1024, {1e6 * dec[1]['favor_step_s']:.0f} at 65536 "
        f"({dec[1]['favor_step_s'] / dec[0]['favor_step_s']:.2f}x); SDPA+KV cache at 65536 "
        f"{1e6 * dec[1]['sdpa_kv_cache_s']:.0f} ({dec[1]['sdpa_kv_cache_s'] / dec[1]['favor_step_s']:.1f}x favor)"
    )
    flat = decode_flatness((1024, 65536), cfg)
    res["decode_flatness"] = {str(c): t for c, t in flat.items()}
    print(
        f"  contexts taking turns, medians of 300 steps: {1e6 * flat[1024]:.0f} us at 1024, "
        f"{1e6 * flat[65536]:.0f} at 65536 ({flat[65536] / flat[1024]:.2f}x)"
    )
    print(f"wrote {write_json(f'targets_{cfg.kernel}', res)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
