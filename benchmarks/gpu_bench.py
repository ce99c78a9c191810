"""The short GPU benchmark behind benchmarks/gpu_check.sh: favor against
scaled_dot_product_attention at L = 4k ... 64k on one device, in float32 (SDPA picks its
memory-efficient kernel) and bfloat16 (SDPA forced to FlashAttention where the build has it):

- bidirectional forward, causal forward + backward: median ms, peak MiB above the inputs
  (the CUDA allocator's statistics), SDPA time / favor time;
- decoding: ms per token, favor.step from the state vs SDPA over a KV cache.

Every contender is checked against its reference on the device first (favor.benchmarking.timing's
check_contender); a failing check is recorded and nothing is timed. Out-of-memory is
recorded per row, not fatal.

    python -m benchmarks.gpu_bench --device cuda --out runs/gpu_check
    python -m benchmarks.gpu_bench --device cpu --quick --out /tmp/x     # the suite's dry run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _sdpa_context(device: str, dtype):
    """FlashAttention for half types on CUDA (if this build has it), else SDPA's own choice."""
    import torch

    if torch.device(device).type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            if torch.backends.cuda.flash_sdp_enabled():
                return sdpa_kernel([SDPBackend.FLASH_ATTENTION]), "flash"
        except ImportError:
            pass
    return contextlib.nullcontext(), "default"


def _time(fns: dict, inputs, *, backward: bool, repeats: int, device: str) -> dict[str, float]:
    """Median seconds per call, contenders interleaved round by round, 1 warm-up each."""
    from favor.benchmarking.timing import run_once, sync

    q, k, v = inputs
    for f in fns.values():
        run_once(f, q, k, v, backward)
    times: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(repeats):
        for n, f in fns.items():
            sync(device)
            t0 = time.perf_counter()
            run_once(f, q, k, v, backward)
            sync(device)
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


def _peak_mib(f, inputs, *, backward: bool, device: str) -> float | None:
    import torch

    from favor.benchmarking.timing import run_once, sync

    if torch.device(device).type != "cuda":
        return None  # CPU peak memory needs a fresh process: benchmarks.speed measures it
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    run_once(f, *inputs, backward)
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def run(args) -> dict:
    import torch
    import torch.nn.functional as F

    import favor
    from favor.benchmarking.timing import (
        BenchConfig,
        bench_feature_map,
        bench_inputs,
        check_contender,
        decode_latency,
        machine_info,
    )

    t_start = time.perf_counter()
    lengths = [int(x) for x in args.lengths.split(",")]
    report: dict = {"machine": machine_info(args.device), "checks": {}, "rows": [], "decode": []}
    report["method"] = (
        f"1 warm-up + median of {args.repeats}, favor and SDPA interleaved, torch.cuda.synchronize around each call; "
        "peak = max_memory_allocated above the inputs"
    )
    for dname in args.dtypes.split(","):
        dtype = getattr(torch, DTYPES[dname])
        cfg = BenchConfig(dtype=dtype, device=args.device)
        report["config"] = {k: str(v) for k, v in cfg.__dict__.items() if k != "dtype"}
        check_length = 64 if args.quick else 256
        checks = {
            n: check_contender(n, cfg, length=check_length) for n in ("favor", "sdpa", "favor-causal", "sdpa-causal")
        }
        report["checks"][dname] = {n: {"ok": ok, "detail": d} for n, (ok, d) in checks.items()}
        print(f"[{dname}] checks: " + ", ".join(f"{n} {'ok' if ok else 'FAILED'}" for n, (ok, _) in checks.items()))
        if not all(ok for ok, _ in checks.values()):
            continue  # a contender that fails its check is never timed
        fm = bench_feature_map(cfg)
        ctx, backend = _sdpa_context(args.device, dtype)
        for length in lengths:
            for mode, causal, backward in (("bidirectional fwd", False, False), ("causal fwd+bwd", True, True)):
                row = {"dtype": dname, "mode": mode, "L": length, "sdpa_backend": backend}
                fns = {
                    "favor": lambda q, k, v, c=causal, fm=fm: favor.attention(q, k, v, fm, causal=c),
                    "sdpa": lambda q, k, v, c=causal: F.scaled_dot_product_attention(q, k, v, is_causal=c),
                }
                try:
                    with ctx:
                        inputs = bench_inputs(length, cfg, grad=backward)
                        t = _time(fns, inputs, backward=backward, repeats=args.repeats, device=args.device)
                        row.update(
                            favor_ms=1e3 * t["favor"],
                            sdpa_ms=1e3 * t["sdpa"],
                            sdpa_over_favor=t["sdpa"] / t["favor"],
                            favor_mib=_peak_mib(fns["favor"], inputs, backward=backward, device=args.device),
                            sdpa_mib=_peak_mib(fns["sdpa"], inputs, backward=backward, device=args.device),
                        )
                        del inputs
                except torch.OutOfMemoryError as e:
                    row["error"] = f"out of memory: {str(e).splitlines()[0]}"
                except RuntimeError as e:  # e.g. no FlashAttention kernel for this GPU
                    row["error"] = str(e).splitlines()[0]
                if torch.device(args.device).type == "cuda":
                    torch.cuda.empty_cache()
                report["rows"].append(row)
                if "error" in row:
                    print(f"[{dname}] {mode} L={length}: {row['error']}")
                else:
                    print(
                        f"[{dname}] {mode} L={length}: favor {row['favor_ms']:.2f} ms, SDPA ({backend}) "
                        f"{row['sdpa_ms']:.2f} ms, SDPA/favor {row['sdpa_over_favor']:.2f}x"
                    )
        for context in [int(x) for x in args.decode_contexts.split(",") if x]:
            try:
                d = decode_latency(context, cfg, steps=args.decode_steps)
                row = {
                    "dtype": dname,
                    "context": context,
                    "favor_ms_per_token": 1e3 * d["favor_step_s"],
                    "sdpa_kv_ms_per_token": 1e3 * d["sdpa_kv_cache_s"],
                    "sdpa_over_favor": d["sdpa_kv_cache_s"] / d["favor_step_s"],
                }
                print(
                    f"[{dname}] decode context={context}: favor.step {row['favor_ms_per_token']:.3f} ms/token, "
                    f"SDPA+KV cache {row['sdpa_kv_ms_per_token']:.3f} ms/token"
                )
            except torch.OutOfMemoryError as e:
                row = {"dtype": dname, "context": context, "error": f"out of memory: {str(e).splitlines()[0]}"}
            report["decode"].append(row)
    report["seconds"] = time.perf_counter() - t_start
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_bench", description=__doc__)
    parser.add_argument("--device", default="cuda", help="torch device (cuda, cuda:1, cpu for a dry run)")
    parser.add_argument("--out", default="runs/gpu_check", help="folder for gpu_bench.json")
    parser.add_argument("--lengths", default="4096,16384,65536")
    parser.add_argument("--dtypes", default="float32,bfloat16", help=f"comma-separated, of {sorted(DTYPES)}")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decode-contexts", default="4096,16384,65536")
    parser.add_argument("--decode-steps", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a dry run of the script, e.g. on a CPU)")
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths, args.dtypes, args.repeats = "64", "float32", 1
        args.decode_contexts, args.decode_steps = "64", 3
    bad = [d for d in args.dtypes.split(",") if d not in DTYPES]
    if bad:
        parser.error(f"--dtypes: unknown {bad}; choose from {sorted(DTYPES)}")
    import torch

    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch.cuda.is_available() is False")
    report = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu_bench.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {path} ({report['seconds']:.0f} s)")
    failed = [d for d, c in report["checks"].items() if not all(x["ok"] for x in c.values())]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
