"""favor demo: what favor is, in three tables and a few plots (under 2-3 minutes on 2 cores).

(a) approximation: each kernel vs exact softmax attention, M in {64, 256, 1024}, two logit
    scales, next to the uniform-attention baseline;
(b) speed and memory: favor bidirectional and causal vs scaled_dot_product_attention;
(c) a small protein language model: FAVOR vs softmax of the same size, trained the same way.
JSON and PNG go to --out (default runs/demo/).
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    parser.add_argument("--lengths", default="1024,4096,16384", help="sequence lengths for the speed table")
    parser.add_argument("--lm-seconds", type=float, default=60.0, help="time budget of the LM comparison (0 skips it)")
    parser.add_argument("--skip-speed", action="store_true", help="skip the speed and memory table")


def _print_table(title: str, header: list[str], rows: list[list]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    print(f"\n{title}")
    print("  ".join(str(h).rjust(w) for h, w in zip(header, widths, strict=True)))
    for r in rows:
        print("  ".join(str(x).rjust(w) for x, w in zip(r, widths, strict=True)))


def _plot_approximation(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = sorted({r["logit_std"] for r in rows})
    fig, axes = plt.subplots(1, len(scales), figsize=(5 * len(scales), 4), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, s in zip(axes, scales, strict=True):
        sub = [r for r in rows if r["logit_std"] == s]
        for kernel in dict.fromkeys(r["kernel"] for r in sub):
            pts = [(r["num_features"], r["rel_error"]) for r in sub if r["kernel"] == kernel and r["num_features"]]
            if pts:
                ax.loglog(*zip(*pts, strict=True), marker="o", label=kernel)
        ax.axhline(sub[0]["uniform_baseline"], color="gray", ls="--", label="uniform attention")
        ms = sorted({r["num_features"] for r in sub if r["num_features"]})
        ref = [sub[0]["rel_error"] * (ms[0] / m) ** 0.5 for m in ms]
        ax.loglog(ms, ref, color="black", ls=":", label="M^-1/2")
        ax.set_title(f"logit std {s}")
        ax.set_xlabel("random features M")
    axes[0].set_ylabel("|out - exact| / |exact|")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _approximation(out: Path) -> list[dict]:
    from ..benchmarking.approximation import approximation_table

    rows = approximation_table()
    _print_table(
        "(a) approximation of exact softmax attention: |out - exact| / |exact|  (L=1024, D=64, H=4, float32)",
        ["logit std", "kernel", "M", "rel error", "uniform baseline"],
        [
            [
                r["logit_std"],
                r["kernel"],
                r["num_features"] or "-",
                f"{r['rel_error']:.4f}",
                f"{r['uniform_baseline']:.4f}",
            ]
            for r in rows
        ],
    )
    _plot_approximation(rows, out / "approximation.png")
    return rows


def _plot_speed(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    series = [
        ("favor_fwd", "favor bidirectional fwd", "C0", "-"),
        ("sdpa_fwd", "SDPA fwd", "C0", "--"),
        ("favor_causal_fwdbwd", "favor causal fwd+bwd", "C3", "-"),
        ("sdpa_causal_fwdbwd", "SDPA causal fwd+bwd", "C3", "--"),
    ]
    for key, label, color, ls in series:
        for ax, unit in ((ax_t, "ms"), (ax_m, "mib")):
            pts = [(r["L"], r.get(f"{key}_{unit}")) for r in rows if r.get(f"{key}_{unit}") is not None]
            if pts:
                ax.loglog(*zip(*pts, strict=True), marker="o", color=color, ls=ls, label=label)
    ax_t.set(xlabel="sequence length L", ylabel="time (ms)", title="time (B=1, H=8, D=64, M=256)")
    ax_m.set(xlabel="sequence length L", ylabel="peak memory above baseline (MiB)", title="peak memory")
    ax_t.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _speed(out: Path, lengths: list[int]) -> list[dict]:
    from .bench import demo_speed_table

    rows = demo_speed_table(lengths, out=out, print_table=_print_table)
    _plot_speed(rows, out / "speed.png")
    return rows


def _language_model(out: Path, seconds: float) -> dict:
    from ..training.demo import lm_demo

    res = lm_demo(out / "lm", seconds=seconds)
    print("\n(c) protein language model, FAVOR vs softmax attention of the same size (embedded Swiss-Prot extract)")
    for key, value in res.items():
        print(f"  {key}: {value}")
    return res


def run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report: dict = {"approximation": _approximation(out)}
    if not args.skip_speed:
        report["speed"] = _speed(out, [int(x) for x in args.lengths.split(",")])
    if args.lm_seconds > 0:
        report["language_model"] = _language_model(out, args.lm_seconds)
    (out / "demo.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote {out}/demo.json and PNG plots in {time.perf_counter() - t0:.0f} s")
    return 0
