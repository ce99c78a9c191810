"""``favor bench``'s run: time and peak memory vs sequence length, favor against exact
attention (scaled_dot_product_attention) and performer-pytorch when installed, the
crossovers, decoding latency; the table, bench.json and bench.png.

The measurement code is ``favor.benchmarking.timing``; this module runs the grid (skipping a
contender predicted to run too long or too large), finds the crossovers, and reports.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .tables import format_table
from .timing import (
    CONTENDERS,
    BenchConfig,
    check_contender,
    decode_flatness,
    decode_latency,
    flops,
    machine_info,
    matmul_gflops,
    peak_memory_mib,
    time_contenders,
)

__all__ = ["MODES", "run_bench", "crossover", "ratio_table", "plot", "bench_report"]

MODES = {"fwd": False, "fwdbwd": True}


def _predict(done: dict, name: str, mode: str, length: int, key: str) -> float | None:
    """Extrapolate a contender's time or memory from its largest measured length."""
    prev = [(n, r[key]) for (c, m, n), r in done.items() if c == name and m == mode and r.get(key) is not None]
    if not prev:
        return None
    n, value = max(prev)
    return value * (length / n) ** CONTENDERS[name].exponent


def crossover(rows: list[dict], fast: str, slow: str, mode: str) -> int | None:
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
        "favor_vs_sdpa_fwd": crossover(rows, "favor", "sdpa", "fwd"),
        "favor_vs_sdpa_fwdbwd": crossover(rows, "favor", "sdpa", "fwdbwd"),
        "favor_causal_vs_sdpa_causal_fwd": crossover(rows, "favor-causal", "sdpa-causal", "fwd"),
        "favor_causal_vs_sdpa_causal_fwdbwd": crossover(rows, "favor-causal", "sdpa-causal", "fwdbwd"),
    }
    return {
        "machine": info,
        "config": {k: str(v) for k, v in cfg.__dict__.items()},
        "matmul_gflops": gflops,
        "checks": {n: {"ok": c[0], "detail": c[1]} for n, c in checks.items()},
        "rows": rows,
        "crossovers": crossovers,
    }


def ratio_table(rows: list[dict]) -> list[list]:
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


def bench_report(
    lengths: list[int],
    *,
    cfg: BenchConfig,
    repeats: int,
    max_seconds: float,
    memory: bool,
    quick: bool,
    decode_contexts: list[int],
    out: Path,
    echo: Callable[[str], None],
    progress: Callable[..., None] | None = None,
) -> dict:
    """``favor bench``: the machine, the grid (``run_bench``) with its ratio table, decoding
    latency per context, the crossovers; writes OUT/bench.json and bench.png (bench_quick.*
    for ``quick``). Lines of text go to ``echo``; returns the report."""
    info = machine_info(cfg.device)
    echo(
        f"device: {info['device']} {info['gpu'] or ''}; machine: {info['cpu']}, {info['cores']} cores, {info['threads']} torch threads, torch {info['torch']}, load {info['load_avg']}, OMP_WAIT_POLICY {info['omp_wait_policy']}"
    )
    echo(
        f"shapes: B={cfg.batch} H={cfg.heads} D={cfg.dim} M={cfg.num_features} kernel={cfg.kernel} {cfg.dtype}; lengths {lengths}"
    )
    echo(
        f"method: 1 warm-up + median of {repeats}, contenders interleaved; peak memory = ru_maxrss of a fresh process - baseline"
    )
    t0 = time.perf_counter()
    report = run_bench(
        lengths,
        cfg=cfg,
        repeats=repeats,
        max_seconds=max_seconds,
        memory=memory,
        # performer-pytorch's causal mode without its CUDA kernel takes seconds even at L=1024
        exclude=("performer-pytorch-causal",) if quick else (),
        progress=progress,
    )
    for name, c in report["checks"].items():
        echo(f"check {name}: {'ok' if c['ok'] else 'FAILED (not timed)'} - {c['detail']}")
    echo(f"matmul (float32 GEMM 2048^3) measured now: {report['matmul_gflops']:.1f} GFLOP/s")
    echo(
        format_table(
            "time and peak memory (x = SDPA time / contender time, same mode; % = fraction of the matmul GFLOP/s)",
            ["mode", "L", "contender", "ms", "MiB", "x vs SDPA", "% matmul", "note"],
            ratio_table(report["rows"]),
        )
    )
    decode = []
    for ctx in decode_contexts:
        with torch.no_grad():
            decode.append(decode_latency(ctx, cfg, steps=20 if quick else 100))
    if decode:
        # favor's per-token cost with the contexts taking turns (no drift between them)
        flat = decode_flatness(tuple(decode_contexts), cfg, steps=20 if quick else 50, rounds=3 if quick else 6)
        for d in decode:
            d["favor_step_s"] = flat[d["context"]]
        base = decode[0]["favor_step_s"]
        echo(
            format_table(
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
        )
    report["decode"] = decode
    echo(f"crossovers (smallest L from which favor stays faster): {report['crossovers']}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = "bench_quick" if quick else "bench"
    (out / f"{name}.json").write_text(json.dumps(report, indent=2, default=str))
    plot(report, out / f"{name}.png")
    echo(f"wrote {out / (name + '.json')} and {out / (name + '.png')} in {time.perf_counter() - t0:.0f} s")
    return report
