"""favor demo: what favor is, as tables with units and a one-line caption each (2-3 minutes
on 2 cores).

(a) approximation: each kernel vs exact softmax attention, M in {64, 256, 1024}, two logit
    scales, next to the uniform-attention baseline;
(b) speed and memory: favor bidirectional and causal vs scaled_dot_product_attention;
(c) a byte-level English language model at a long context: the hybrid Performer (FAVOR+
    with an exact 64-byte window and 4 sinks) vs softmax of the same size, the same
    wall-clock budget each (quality per second against the byte-frequency baseline, memory);
(d) decoding cost per token after 1k-16k tokens of context, from the models of (c).
JSON and PNG go to --out (default runs/demo/).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    parser.add_argument("--lengths", default="1024,4096,16384", help="sequence lengths for the speed table")
    parser.add_argument("--lm-seconds", type=float, default=90.0, help="time budget of the LM comparison (0 skips it)")
    parser.add_argument("--lm-context", type=int, default=8192, help="bytes per training sequence in (c)")
    parser.add_argument("--skip-speed", action="store_true", help="skip the speed and memory table")


def _print_table(title: str, header: list[str], rows: list[list], caption: str | None = None) -> None:
    """A table with right-aligned columns under its title, and a one-line caption."""
    cells = [[str(x) for x in r] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *cells, strict=True)]
    print(f"\n{title}")
    print("  " + "  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    print("  " + "  ".join("-" * w for w in widths))
    for r in cells:
        print("  " + "  ".join(x.rjust(w) for x, w in zip(r, widths, strict=True)))
    if caption:
        print(f"  -> {caption}")


def _sig(x: float | None, digits: int = 3) -> str:
    """``digits`` significant digits, no exponent for the magnitudes the demo prints."""
    if x is None:
        return "-"
    if x == 0 or not math.isfinite(x):
        return str(x)
    decimals = max(0, digits - 1 - int(math.floor(math.log10(abs(x)))))
    return f"{x:.{decimals}f}"


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
    trig = [r for r in rows if r["kernel"] == "trig"]
    worst_trig = max(trig, key=lambda r: r["rel_error"]) if trig else None
    _print_table(
        "(a) approximation of exact softmax attention (L=1024, D=64, H=4, float32, seed 0)",
        ["logit std", "kernel", "M", "rel. error", "uniform attention"],
        [
            [r["logit_std"], r["kernel"], r["num_features"] or "-", _sig(r["rel_error"]), _sig(r["uniform_baseline"])]
            for r in rows
        ],
        caption=(
            "|out - exact| / |exact| next to uniform attention's error: the softmax estimators' error falls as "
            "M^-1/2 and grows with the logit scale"
            + (
                f"; trig (not positive) reaches {_sig(worst_trig['rel_error'])} at logit std {worst_trig['logit_std']}, "
                f"M={worst_trig['num_features']}"
                if worst_trig
                else ""
            )
            + ". relu and elu are other kernels, not estimates of softmax."
        ),
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


def _language_model(out: Path, seconds: float, context: int) -> dict:
    from ..training.demo import TRAIN_SHARE, lm_demo

    res = lm_demo(out / "lm", seconds=seconds, context=context)
    f, s = res["runs"]["hybrid"], res["runs"]["softmax"]
    _print_table(
        f"(c) English byte language model at context {context}: hybrid Performer (FAVOR+, exact window 64, "
        f"4 sinks) vs exact softmax, same size, a {TRAIN_SHARE * seconds:.0f} s training budget each "
        f"({res['threads']} threads)",
        ["attention", "train s", "steps", "tokens seen", "train tokens/s", "held-out bits/byte", "peak step MiB"],
        [
            [
                name,
                f"{r['seconds']:.1f}",
                r["steps"],
                f"{r['tokens'] / 1e3:.0f}k",
                f"{r['tokens_per_s'] / 1e3:.1f}k",
                f"{r['val_bpr']:.3f}",
                f"{r['peak_mib']:.0f}",
            ]
            for name, r in (("hybrid", f), ("softmax", s))
        ]
        + [["byte frequencies", "-", "-", "-", "-", f"{res['unigram_bpr']:.3f}", "-"]],
        caption=(
            f"at {context} bytes the hybrid trains at {f['tokens_per_s'] / s['tokens_per_s']:.1f}x softmax's "
            f"tokens/s, so in the same wall clock it sees {f['tokens'] / max(s['tokens'], 1):.1f}x the tokens and ends "
            f"{abs(s['val_bpr'] - f['val_bpr']):.3f} bits/byte {'below' if f['val_bpr'] < s['val_bpr'] else 'above'} "
            f"softmax and {abs(res['unigram_bpr'] - f['val_bpr']):.2f} "
            f"{'below' if f['val_bpr'] < res['unigram_bpr'] else 'above'} the byte frequencies (lower is better); "
            f"peak memory of one "
            f"training step: {f['peak_mib']:.0f} vs {s['peak_mib']:.0f} MiB (torch's CPU SDPA is memory-lean)."
        ),
    )
    ctx = list(res["decode_ms_per_token"])
    fav, soft = res["decode_ms_per_token"], res["softmax_decode_ms_per_token"]
    kib = res["decode_state_kib"]
    _print_table(
        "(d) decoding after a context of n tokens: time per generated token and the state kept (models of (c))",
        [
            "context n",
            "hybrid ms/token",
            "softmax ms/token",
            "softmax / hybrid",
            "hybrid state KiB",
            "softmax KV cache KiB",
        ],
        [
            [
                n,
                f"{fav[n]:.2f}",
                f"{soft[n]:.2f}",
                f"{soft[n] / fav[n]:.1f}x",
                f"{kib['hybrid']:.0f}",
                f"{kib['softmax'][n]:.0f}",
            ]
            for n in ctx
        ],
        caption=(
            f"the hybrid's state (FAVOR's and a ring of 65 keys) is constant-size: {fav[ctx[-1]] / fav[ctx[0]]:.2f}x the cost at n={ctx[-1]} vs n={ctx[0]}; "
            f"softmax's key/value cache grows with n ({soft[ctx[-1]] / soft[ctx[0]]:.1f}x; its {ctx[-1]} cache is "
            "random keys/values of the right size)."
        ),
    )
    # a model's bytes may be anything: printed as one line of letters, digits and prose punctuation
    text = " ".join("".join(ch if ch.isalnum() or ch in " .,;:!?'-()" else " " for ch in res["sample"]).split())
    print(f"  sampled text (hybrid model, seed 0): {text[:100]}{'...' if len(text) > 100 else ''}")
    return res


def run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report: dict = {"approximation": _approximation(out)}
    if not args.skip_speed:
        report["speed"] = _speed(out, [int(x) for x in args.lengths.split(",")])
    if args.lm_seconds > 0:
        report["language_model"] = _language_model(out, args.lm_seconds, args.lm_context)
    (out / "demo.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"\nwrote {out}/demo.json and PNG plots in {time.perf_counter() - t0:.0f} s")
    return 0
