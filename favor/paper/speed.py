"""favor paper speed: Fig. 3 and App. E, forward+backward time and peak memory of a whole
model against L, for each attention of favor.paper.skeleton, with ratios to the "X" line
(the same model whose attention returns V: the optimum any efficient attention can reach).

Method. One step is embedding -> 6 blocks -> logits -> cross-entropy -> backward, on B = 1
random bytes. At each L the models are built once, checked (favor against the explicit
kernelised reference, SDPA against exact softmax, peers finite), warmed up, then timed
round by round, contenders interleaved, so that a busy machine slows them alike; the
median is reported. Peak memory is the resident set's high-water mark during the warm-up
step above the resident set just before it (Linux ``/proc/self/clear_refs``, after
``malloc_trim``): what a cold step needs, activations, gradients and workspaces. The
timed steps run without that probe (it makes the next step fault its pages in again).
A contender whose predicted step time (its last one, X's part scaled by L linearly and
the rest by its exponent in L: quadratically for SDPA) passes ``time_limit_s``, or whose predicted memory passes
``memory_limit_mib``, is not run at that L and longer ones ("skipped" rows).

On a shared CPU, set OMP_WAIT_POLICY=PASSIVE in the environment (idle OpenMP threads that
spin make favor's many small per-chunk operations several times slower when another job
holds the other core); the policy in force is recorded with the results.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import favor

from .report import markdown_table, write_outputs
from .skeleton import ATTENTIONS, SIZES, FusedSelfAttention, available, build_model

__all__ = ["sweep", "check_attention", "peak_rss_mib", "add_arguments", "run"]

NAME = "speed"

#: the contenders per mode; peers join when installed
BIDIRECTIONAL = ("x", "favor", "sdpa", "performer-pytorch", "reformer-pytorch", "linformer")
CAUSAL = ("x", "favor", "sdpa")


# -- memory -------------------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> int | None:
    """Return freed heap to the OS, reset the peak RSS to the current RSS; the RSS in KiB
    (None where Linux's clear_refs is not available)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _status_kib("VmRSS")


def peak_rss_mib(fn) -> tuple[float | None, float]:
    """(peak resident MiB above the start, seconds) of one call of ``fn``."""
    base = _reset_peak()
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    if base is None or peak is None:
        return None, seconds
    return (peak - base) / 1024, seconds


# -- one model step -----------------------------------------------------------------------
def _step(model, tokens):
    logits = model(tokens)
    loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), tokens.view(-1))
    loss.backward()
    for p in model.parameters():
        p.grad = None


def check_attention(name: str, size: str, *, causal: bool, length: int = 64) -> tuple[bool, str]:
    """Check one layer's attention before timing it. favor: the skeleton's output equals the
    explicit kernelised attention with the same feature map (float64, 1e-8: the same sums
    in another order); SDPA: exact softmax (float64, 1e-8); X: returns V; peers: finite."""
    cfg = SIZES[size]
    model = build_model(cfg, name, causal=causal, length=length).double()
    layer = model.blocks[0].attn.inner
    x = torch.randn(1, length, cfg.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = layer(x)
        if not torch.isfinite(out).all():
            return False, "non-finite output"
        if not isinstance(layer, FusedSelfAttention):
            return True, "finite output (a peer: no exact reference)"
        q, k, v = layer.qkv(x).view(1, length, 3, cfg.heads, cfg.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        core = layer.core(q, k, v)
        if name == "favor":
            want = favor.kernel_attention(q, k, v, layer.core.feature_map, causal=causal)
        elif name == "sdpa":
            want = favor.softmax_attention(q, k, v, causal=causal)
        else:
            want = v
        err = float((core - want).abs().max())
        return err < 1e-8, f"max |{name} - reference| = {err:.1e} (bound 1e-8)"


def _tokens(length: int):
    return torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(0))


def _measure(models: dict, length: int, *, repeats: int) -> dict[str, dict]:
    """Peak MiB from one untimed warm-up step each, then median seconds of ``repeats``
    rounds, contenders interleaved. The peak probe returns freed heap to the OS first, so
    the step after it faults its pages in again (measured: 2x a small model's step); the
    timed steps therefore run without it."""
    tokens = _tokens(length)
    peaks = {n: peak_rss_mib(lambda model=model: _step(model, tokens))[0] for n, model in models.items()}
    times: dict[str, list[float]] = {n: [] for n in models}
    for _ in range(repeats):
        for n, model in models.items():
            t0 = time.perf_counter()
            _step(model, tokens)
            times[n].append(time.perf_counter() - t0)
    return {n: {"time_s": statistics.median(times[n]), "times_s": times[n], "peak_mib": peaks[n]} for n in models}


def sweep(
    size: str,
    lengths: tuple[int, ...],
    *,
    causal: bool = False,
    names: tuple[str, ...] | None = None,
    num_features: int = 256,
    repeats: int = 3,
    long_repeats: int = 2,
    long_from: int = 8192,
    time_limit_s: float = 120.0,
    memory_limit_mib: float = 8192.0,
    only_beyond: dict[int, tuple[str, ...]] | None = None,
    progress=None,
) -> dict:
    """Rows {L, name, time_s, peak_mib, ratio_to_x} for the skeleton ``size`` at each L, and
    the checks and skips. One warm-up round (which measures memory), then ``repeats``
    timed rounds (``long_repeats`` from ``long_from`` on). ``only_beyond`` = {L: names}: from that L on, only these run (to
    reach long L for favor and X without the peers)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    wanted = names or (CAUSAL if causal else BIDIRECTIONAL)
    active, notes = [], {}
    for n in wanted:
        if n not in ATTENTIONS:
            raise ValueError(f"attention must be one of {sorted(ATTENTIONS)}, got {n!r}")
        if not available(n):
            notes[n] = f"not installed ({ATTENTIONS[n].module})"
        elif causal and not ATTENTIONS[n].causal:
            notes[n] = "no causal mode"
        else:
            ok, detail = check_attention(n, size, causal=causal)
            notes[n] = ("check ok: " if ok else "check FAILED, not timed: ") + detail
            if ok:
                active.append(n)
    cfg = SIZES[size]
    rows, last, dropped = [], {}, set()
    for length in sorted(lengths):
        run_now = []
        for n in active:
            if n in dropped or (
                only_beyond and any(length >= lim and n not in keep for lim, keep in only_beyond.items())
            ):
                continue
            if n in last:
                prev_len, prev = last[n]
                ratio = length / prev_len
                # the model's part (X's step) grows linearly; only the excess over X grows
                # with the attention's exponent (quadratically for SDPA)
                base = last["x"][1]["time_s"] if "x" in last and last["x"][0] == prev_len else 0.0
                base = min(base, prev["time_s"])
                predicted = base * ratio + (prev["time_s"] - base) * ratio ** ATTENTIONS[n].exponent
                growth = ratio ** ATTENTIONS[n].exponent
                reason = None
                if predicted > time_limit_s:
                    reason = f"predicted {predicted:.0f} s > {time_limit_s:g} s"
                elif prev["peak_mib"] is not None and prev["peak_mib"] * growth > memory_limit_mib:
                    reason = f"predicted {prev['peak_mib'] * growth:.0f} MiB > {memory_limit_mib:g} MiB"
                if reason is not None:
                    rows.append({"L": length, "name": n, "skipped": reason})
                    dropped.add(n)
                    continue
            run_now.append(n)
        if not run_now:
            continue
        models = {n: build_model(cfg, n, causal=causal, num_features=num_features, length=length) for n in run_now}
        reps = long_repeats if length >= long_from else repeats
        got = _measure(models, length, repeats=reps)
        del models
        x_time = got["x"]["time_s"] if "x" in got else None
        for n, r in got.items():
            last[n] = (length, r)
            rows.append({"L": length, "name": n, **r, "ratio_to_x": None if x_time is None else r["time_s"] / x_time})
        if progress is not None:
            progress(length, got)
    return {
        "size": size,
        "config": dataclasses.asdict(cfg),
        "causal": causal,
        "num_features": num_features,
        "checks": notes,
        "rows": rows,
    }


# -- the command --------------------------------------------------------------------------
#: (size, causal, lengths, only_beyond) per sweep; only_beyond as in ``sweep``
FULL = (
    ("small", False, (1024, 4096, 16384, 32768, 65536), None),
    ("small", True, (1024, 4096, 16384, 32768), None),
    ("regular", False, (1024, 4096, 16384, 32768), {32768: ("x", "favor")}),
    ("regular", True, (1024, 4096, 16384), None),
)
QUICK = (
    ("small", False, (256, 512), None),
    ("small", True, (256, 512), None),
)


def _label(s: dict) -> str:
    return f"{s['size']}, {'causal' if s['causal'] else 'bidirectional'}"


def _plot(sweeps: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, len(sweeps), figsize=(4.2 * len(sweeps), 10), squeeze=False)
    for col, s in enumerate(sweeps):
        names = list(dict.fromkeys(r["name"] for r in s["rows"] if "skipped" not in r))
        for n in names:
            rows = [r for r in s["rows"] if r["name"] == n and "skipped" not in r]
            ls = [r["L"] for r in rows]
            style = dict(marker="o", ms=3, label=n, ls="--" if n == "x" else "-", color="k" if n == "x" else None)
            axes[0][col].plot(ls, [r["time_s"] for r in rows], **style)
            axes[1][col].plot(ls, [r["ratio_to_x"] for r in rows], **style)
            if all(r["peak_mib"] is not None for r in rows):
                axes[2][col].plot(ls, [r["peak_mib"] for r in rows], **style)
        axes[0][col].set_title(_label(s))
        for row, ylabel in zip(range(3), ("fwd+bwd s", "time / X", "peak MiB above start"), strict=True):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("L")
            ax.set_ylabel(ylabel)
        axes[0][col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _table(sweeps: list[dict]) -> str:
    text = ""
    for s in sweeps:
        text += f"### {_label(s)} (M={s['num_features']})\n\n"
        rows = []
        for r in s["rows"]:
            if "skipped" in r:
                rows.append([r["L"], r["name"], "skipped", "", r["skipped"]])
            else:
                peak = "" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
                ratio = "" if r["ratio_to_x"] is None else f"{r['ratio_to_x']:.2f}x"
                rows.append([r["L"], r["name"], f"{1e3 * r['time_s']:.0f}", ratio, peak])
        text += markdown_table(["L", "attention", "fwd+bwd ms (median)", "time / X", "peak MiB"], rows)
        text += "\nchecks: " + "; ".join(f"{n}: {c}" for n, c in s["checks"].items()) + "\n\n"
    return text


def add_arguments(parser) -> None:
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2, as the issue measured)")
    parser.add_argument(
        "--time-limit", type=float, default=None, help="skip steps predicted longer (s; default 90, quick 10)"
    )
    parser.add_argument("--memory-limit", type=float, default=8192, help="skip steps predicted larger (MiB)")
    parser.add_argument(
        "--only", choices=("regular", "small"), default=None, help="run the sweeps of one model size only"
    )
    parser.add_argument(
        "--mode", choices=("both", "bidirectional", "causal"), default="both", help="which sweeps to run"
    )
    parser.add_argument("--lengths", default=None, help="comma-separated L, replacing each sweep's own")
    parser.add_argument("--names", default=None, help="comma-separated attentions, replacing each sweep's own")


def run(args) -> int:
    torch.set_num_threads(args.threads)
    plan = QUICK if args.quick else FULL
    if args.only:
        plan = tuple(p for p in plan if p[0] == args.only)
    if args.mode != "both":
        plan = tuple(p for p in plan if p[1] == (args.mode == "causal"))
    if args.lengths:
        plan = tuple(
            (size, causal, tuple(int(x) for x in args.lengths.split(",")), None) for size, causal, _, _ in plan
        )
    names = tuple(args.names.split(",")) if args.names else None
    limit = args.time_limit or (10.0 if args.quick else 90.0)
    t0 = time.perf_counter()
    sweeps: list[dict] = []
    out = Path(args.out)
    for size, causal, lengths, only_beyond in plan:
        with tqdm(
            total=len(lengths), desc=f"{size} {'causal' if causal else 'bidirectional'}", disable=args.quick
        ) as bar:

            def progress(length, got, bar=bar):
                bar.set_postfix(L=length, **{n: f"{r['time_s']:.2f}s" for n, r in got.items()})
                bar.update(1)

            s = sweep(
                size,
                lengths,
                causal=causal,
                names=names,
                repeats=3,
                long_repeats=2,
                # a regular-size step takes seconds from L = 4096 on: 2 timed rounds there
                long_from=4096 if size == "regular" else 8192,
                time_limit_s=limit,
                memory_limit_mib=args.memory_limit,
                only_beyond=only_beyond,
                progress=progress,
            )
        sweeps.append(s)
        # written after every sweep: a long run stopped part-way keeps what it measured
        payload = {
            "wall_s": time.perf_counter() - t0,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
            "load_avg_end": os.getloadavg(),
            "sweeps": sweeps,
        }
        table = _table(sweeps)
        paths = write_outputs(out, NAME, payload, table)
        _plot(sweeps, out / f"{NAME}.png")
    wall = time.perf_counter() - t0
    print(table)
    print(f"wrote {paths['json']}, {paths['md']}, {out / (NAME + '.png')} in {wall:.1f} s")
    return 0
