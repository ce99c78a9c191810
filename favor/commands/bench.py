"""favor bench: time and peak memory vs sequence length, favor against exact attention
(scaled_dot_product_attention) and performer-pytorch when installed; decoding latency.

Prints the machine, a table and the ratios; writes bench.json and bench.png (log-log time
and memory vs L, crossover marked) under --out. ``--quick`` stays under 2 minutes on a
2-core CPU. The measurement code is favor.benchmarking.timing (also behind ``favor demo``'s speed table).
On a machine shared with other jobs run it with OMP_WAIT_POLICY=PASSIVE: spinning OpenMP
threads whose sibling core is busy slow 2-thread matmuls many times over.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..benchmarking.timing import (
    CONTENDERS,
    BenchConfig,
    check_contender,
    decode_flatness,
    decode_latency,
    flops,
    machine_info,
    matmul_gflops,
    peak_memory_mib,
    speed_table,
    time_contenders,
)

__all__ = ["speed_table", "demo_speed_table", "run_bench", "add_arguments", "run"]

MODES = {"fwd": False, "fwdbwd": True}


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


def _predict(done: dict, name: str, mode: str, length: int, key: str) -> float | None:
    """Extrapolate a contender's time or memory from its largest measured length."""
    prev = [(n, r[key]) for (c, m, n), r in done.items() if c == name and m == mode and r.get(key) is not None]
    if not prev:
        return None
    n, value = max(prev)
    return value * (length / n) ** CONTENDERS[name].exponent


def _crossover(rows: list[dict], fast: str, slow: str, mode: str) -> int | None:
    """Smallest measured L from which ``fast`` beats ``slow`` at every measured longer L."""
    pairs = {}
    for r in rows:
        if r["mode"] == mode and r["time_s"] is not None and r["contender"] in (fast, slow):
            pairs.setdefault(r["L"], {})[r["contender"]] = r["time_s"]
    both = sorted((length, t[fast] < t[slow]) for length, t in pairs.items() if len(t) == 2)
    cross = None
    for length, wins in reversed(both):
        if not wins:
            break
        cross = length
    return cross


def run_bench(
    lengths: list[int],
    *,
    cfg: BenchConfig,
    repeats: int,
    max_seconds: float,
    memory: bool,
    max_memory_mib: float = 6144.0,
    exclude: tuple[str, ...] = (),
    progress=None,
) -> dict:
    info = machine_info(cfg.device)
    gflops = matmul_gflops(device=cfg.device)
    names = [n for n, c in CONTENDERS.items() if c.available() and n not in exclude]
    checks = {n: check_contender(n, cfg) for n in names}
    ok = [n for n in names if checks[n][0]]
    done: dict = {}
    for length in lengths:
        for mode, backward in MODES.items():
            run_names = []
            for name in ok:
                t_pred = _predict(done, name, mode, length, "time_s")
                m_pred = _predict(done, name, mode, length, "mem_mib")
                # favor itself always runs: the grid bounds it, and its large-L rows are the point
                if name.startswith("favor"):
                    run_names.append(name)
                elif t_pred is not None and t_pred * (repeats + 2) > max_seconds:
                    done[(name, mode, length)] = {"skipped": f"predicted {t_pred:.1f} s per call"}
                elif m_pred is not None and m_pred > max_memory_mib:
                    done[(name, mode, length)] = {"skipped": f"predicted {m_pred:.0f} MiB"}
                else:
                    run_names.append(name)
            times = time_contenders(run_names, length, cfg, backward=backward, repeats=repeats) if run_names else {}
            for name in run_names:
                mem = peak_memory_mib(name, length, cfg, backward=backward)[0] if memory else None
                done[(name, mode, length)] = {"time_s": times[name], "mem_mib": mem}
            if progress is not None:
                progress(length, mode)
    rows = []
    for (name, mode, length), r in done.items():
        f = flops(name, length, cfg) if mode == "fwd" else None
        t = r.get("time_s")
        rows.append(
            {
                "contender": name,
                "mode": mode,
                "L": length,
                "time_s": t,
                "mem_mib": r.get("mem_mib"),
                "gflops": None if (f is None or t is None) else f / t / 1e9,
                "matmul_fraction": None if (f is None or t is None) else f / t / 1e9 / gflops,
                "skipped": r.get("skipped"),
            }
        )
    crossovers = {
        "favor_vs_sdpa_fwd": _crossover(rows, "favor", "sdpa", "fwd"),
        "favor_vs_sdpa_fwdbwd": _crossover(rows, "favor", "sdpa", "fwdbwd"),
        "favor_causal_vs_sdpa_causal_fwd": _crossover(rows, "favor-causal", "sdpa-causal", "fwd"),
        "favor_causal_vs_sdpa_causal_fwdbwd": _crossover(rows, "favor-causal", "sdpa-causal", "fwdbwd"),
    }
    return {
        "machine": info,
        "config": {k: str(v) for k, v in cfg.__dict__.items()},
        "matmul_gflops": gflops,
        "checks": {n: {"ok": c[0], "detail": c[1]} for n, c in checks.items()},
        "rows": rows,
        "crossovers": crossovers,
    }


def _ratio_table(rows: list[dict]) -> list[list]:
    by = {(r["contender"], r["mode"], r["L"]): r for r in rows}
    lengths = sorted({r["L"] for r in rows})
    out = []
    for mode in MODES:
        for length in lengths:
            for name in CONTENDERS:
                r = by.get((name, mode, length))
                if r is None:
                    continue
                if r["time_s"] is None:
                    out.append([mode, length, name, "skipped", "-", "-", "-", r["skipped"]])
                    continue
                base = by.get(("sdpa-causal" if "causal" in name else "sdpa", mode, length))
                ratio = base["time_s"] / r["time_s"] if base and base.get("time_s") else None
                out.append(
                    [
                        mode,
                        length,
                        name,
                        f"{1e3 * r['time_s']:.1f}",
                        "-" if r["mem_mib"] is None else f"{r['mem_mib']:.0f}",
                        "-" if ratio is None else f"{ratio:.2f}x",
                        "-" if r["matmul_fraction"] is None else f"{100 * r['matmul_fraction']:.0f}%",
                        "",
                    ]
                )
    return out


def _print_table(title: str, header: list[str], rows: list[list], caption: str | None = None) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)] if rows else []
    print(f"\n{title}")
    if rows:
        print("  ".join(str(h).rjust(w) for h, w in zip(header, widths, strict=True)))
        for r in rows:
            print("  ".join(str(x).rjust(w) for x, w in zip(r, widths, strict=True)))
    if caption:
        print(f"  -> {caption}")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    panels = [
        ("fwd", "time_s", "forward time (s)", "favor_vs_sdpa_fwd", "favor_causal_vs_sdpa_causal_fwd"),
        (
            "fwdbwd",
            "time_s",
            "forward + backward time (s)",
            "favor_vs_sdpa_fwdbwd",
            "favor_causal_vs_sdpa_causal_fwdbwd",
        ),
        ("fwd", "mem_mib", "forward peak memory (MiB above baseline)", None, None),
        ("fwdbwd", "mem_mib", "forward + backward peak memory (MiB)", None, None),
    ]
    styles = {"favor": "C0-o", "favor-causal": "C0--s", "sdpa": "C1-o", "sdpa-causal": "C1--s"}
    for ax, (mode, key, label, cross_bi, cross_causal) in zip(axes.flat, panels, strict=True):
        for name in CONTENDERS:
            pts = sorted((r["L"], r[key]) for r in rows if r["contender"] == name and r["mode"] == mode and r[key])
            if pts:
                ax.loglog(
                    *zip(*pts, strict=True), styles.get(name, "C2-^" if "causal" not in name else "C2--v"), label=name
                )
        for cross, color, tag in ((cross_bi, "C0", "bidirectional"), (cross_causal, "C3", "causal")):
            length = report["crossovers"].get(cross) if cross else None
            if length:
                ax.axvline(length, color=color, alpha=0.4, linestyle=":")
                ax.annotate(
                    f"{tag} crossover L={length}",
                    (length, 0.5),
                    xycoords=("data", "axes fraction"),
                    rotation=90,
                    fontsize=8,
                )
        ax.set_xlabel("sequence length L")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    m = report["machine"]
    c = report["config"]
    fig.suptitle(
        f"favor vs exact attention - {m['cpu']}, {m['threads']} threads, torch {m['torch']}; "
        f"B={c['batch']} H={c['heads']} D={c['dim']} M={c['num_features']} {c['dtype']}",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def demo_speed_table(lengths, *, out: Path | None = None, print_table=_print_table) -> list[dict]:
    """The speed section of ``favor demo``: favor vs SDPA at a few lengths (~40 s)."""
    rows = speed_table(tuple(lengths), quick=True)

    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    last = rows[-1] if rows else {}
    both = [r for r in rows if r.get("favor_causal_fwdbwd_mib") is not None and r.get("sdpa_causal_fwdbwd_mib")]
    mem = (
        f"; peak MiB of causal forward+backward at L={both[-1]['L']}: favor {both[-1]['favor_causal_fwdbwd_mib']:.0f}, "
        f"SDPA {both[-1]['sdpa_causal_fwdbwd_mib']:.0f}"
        if both
        else ""
    )
    print_table(
        "(b) speed and peak memory vs exact attention (scaled_dot_product_attention), B=1 H=8 D=64 M=256 float32",
        [
            "L",
            "favor fwd ms",
            "SDPA fwd ms",
            "speed-up",
            "favor causal f+b ms",
            "SDPA causal f+b ms",
            "speed-up",
            "favor causal f+b MiB",
            "SDPA causal f+b MiB",
        ],
        [
            [
                r["L"],
                fmt(r["favor_fwd_ms"], ".1f"),
                fmt(r["sdpa_fwd_ms"], ".1f"),
                fmt(r["fwd_speedup"], ".1f") + "x",
                fmt(r["favor_causal_fwdbwd_ms"], ".1f"),
                fmt(r["sdpa_causal_fwdbwd_ms"], ".1f"),
                fmt(r["causal_fwdbwd_speedup"], ".1f") + "x",
                fmt(r.get("favor_causal_fwdbwd_mib"), ".0f"),
                fmt(r.get("sdpa_causal_fwdbwd_mib"), ".0f"),
            ]
            for r in rows
        ],
        caption=(
            "milliseconds per call (median, interleaved), peak MiB of a fresh process; favor's time is linear in L, "
            f"SDPA's quadratic: at L={last.get('L')} favor runs at {fmt(last.get('fwd_speedup'), '.1f')}x SDPA's "
            f"speed forward and {fmt(last.get('causal_fwdbwd_speedup'), '.1f')}x causal forward+backward" + mem
            if rows
            else None
        ),
    )
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "speed.json").write_text(json.dumps(rows, indent=2))
    return rows


def run(args) -> int:
    import torch
    from tqdm import tqdm

    cfg = BenchConfig(kernel=args.kernel, device=args.device)
    if args.lengths:
        lengths = [int(x) for x in args.lengths.split(",")]
    else:
        lengths = [1024, 2048, 4096] if args.quick else [256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
    repeats = args.repeats or (3 if args.quick else 5)
    max_seconds = args.max_seconds or (12.0 if args.quick else 150.0)
    info = machine_info(cfg.device)
    print(
        f"device: {info['device']} {info['gpu'] or ''}; machine: {info['cpu']}, {info['cores']} cores, {info['threads']} torch threads, torch {info['torch']}, load {info['load_avg']}, OMP_WAIT_POLICY {info['omp_wait_policy']}"
    )
    print(
        f"shapes: B={cfg.batch} H={cfg.heads} D={cfg.dim} M={cfg.num_features} kernel={cfg.kernel} {cfg.dtype}; lengths {lengths}"
    )
    print(
        f"method: 1 warm-up + median of {repeats}, contenders interleaved; peak memory = ru_maxrss of a fresh process - baseline"
    )
    t0 = time.perf_counter()
    bar = tqdm(total=len(lengths) * len(MODES), desc="bench", unit="cfg")
    report = run_bench(
        lengths,
        cfg=cfg,
        repeats=repeats,
        max_seconds=max_seconds,
        memory=not args.no_memory,
        # performer-pytorch's causal mode without its CUDA kernel takes seconds even at L=1024
        exclude=("performer-pytorch-causal",) if args.quick else (),
        progress=lambda *_: bar.update(),
    )
    bar.close()
    for name, c in report["checks"].items():
        print(f"check {name}: {'ok' if c['ok'] else 'FAILED (not timed)'} - {c['detail']}")
    print(f"matmul (float32 GEMM 2048^3) measured now: {report['matmul_gflops']:.1f} GFLOP/s")
    _print_table(
        "time and peak memory (x = SDPA time / contender time, same mode; % = fraction of the matmul GFLOP/s)",
        ["mode", "L", "contender", "ms", "MiB", "x vs SDPA", "% matmul", "note"],
        _ratio_table(report["rows"]),
    )
    decode = []
    contexts = [int(x) for x in args.decode_contexts.split(",") if x]
    for ctx in contexts:
        with torch.no_grad():
            decode.append(decode_latency(ctx, cfg, steps=20 if args.quick else 100))
    if decode:
        # favor's per-token cost with the contexts taking turns (no drift between them)
        flat = decode_flatness(tuple(contexts), cfg, steps=20 if args.quick else 50, rounds=3 if args.quick else 6)
        for d in decode:
            d["favor_step_s"] = flat[d["context"]]
        base = decode[0]["favor_step_s"]
        _print_table(
            "decoding: seconds per token (median), favor.step (contexts taking turns) vs SDPA with a KV cache",
            ["context", "favor us/token", "vs first context", "SDPA+KV cache us/token", "SDPA / favor"],
            [
                [
                    d["context"],
                    f"{1e6 * d['favor_step_s']:.0f}",
                    f"{d['favor_step_s'] / base:.2f}x",
                    f"{1e6 * d['sdpa_kv_cache_s']:.0f}",
                    f"{d['sdpa_kv_cache_s'] / d['favor_step_s']:.1f}x",
                ]
                for d in decode
            ],
        )
    report["decode"] = decode
    print(f"crossovers (smallest L from which favor stays faster): {report['crossovers']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "bench_quick" if args.quick else "bench"
    (out / f"{name}.json").write_text(json.dumps(report, indent=2, default=str))
    plot(report, out / f"{name}.png")
    print(f"wrote {out / (name + '.json')} and {out / (name + '.png')} in {time.perf_counter() - t0:.0f} s")
    return 0
