"""favor paper feature-error: Fig. 4, the MSE of FAVOR's attention output against exact
softmax attention as the number of random features M grows, for each projection (iid,
orthogonal, simplex) and feature map (positive, hyperbolic, trig, FAVOR++ = "oprf").

Inputs as in the paper: L = 4096, D = 16, 15 random inputs, one fresh projection per
input. The paper's "appropriately normalized" inputs are not specified, and the answer
depends on it: q, k, v get N(0, s^2) entries for each s in ``--input-std``. s = 0.5 gives
scaled rows of norm ~1 (|q|^2 / sqrt(D) = s^2 sqrt(D)) and logits of std s^2 = 0.25, the
regime where the estimators' errors fall as 1/M; s = 1 gives unit-variance logits, where
|x + y|^2 ~ 8 and the positive estimator's variance (~ exp(|x + y|^2) / M) is too large
for M <= 256 to help.
M counts projection rows (``FeatureMap(num_features=M)``): hyperbolic and trig then have
2M features each. Everything runs in float64, so the error is the estimator's alone.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

import favor

from .report import markdown_table, write_outputs

__all__ = ["PROJECTIONS", "FEATURE_MAPS", "feature_error", "add_arguments", "run"]

NAME = "feature-error"
PROJECTIONS = ("iid", "orthogonal", "simplex")
FEATURE_MAPS = ("positive", "hyperbolic", "trig", "oprf")


def feature_error(
    *,
    length: int = 4096,
    dim: int = 16,
    inputs: int = 15,
    num_features: tuple[int, ...] = (16, 32, 64, 128, 256),
    projections: tuple[str, ...] = PROJECTIONS,
    kernels: tuple[str, ...] = FEATURE_MAPS,
    input_std: float = 0.5,
    seed: int = 0,
    progress=None,
) -> dict:
    """Rows {projection, kernel, M, mse (mean over inputs), std, per_input} of
    mean((favor.attention - softmax_attention)^2) per input."""
    for name, values, allowed in (("projections", projections, PROJECTIONS), ("kernels", kernels, FEATURE_MAPS)):
        bad = [v for v in values if v not in allowed]
        if bad:
            raise ValueError(f"{name} must be among {allowed}, got {bad}")
    per: dict[tuple[str, str, int], list[float]] = {}
    total = inputs * len(projections) * len(kernels) * len(num_features)
    done = 0
    for i in range(inputs):
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        q, k, v = (input_std * torch.randn(length, dim, generator=gen, dtype=torch.float64) for _ in range(3))
        exact = favor.softmax_attention(q, k, v)
        for p_i, proj in enumerate(projections):
            for kernel in kernels:
                for m in num_features:
                    # one projection per (input, projection kind, M); the kernels share it
                    draw = torch.Generator().manual_seed(((seed * 1000 + i) * 16 + p_i) * 4096 + m)
                    fm = favor.FeatureMap(kernel, dim=dim, num_features=m, projection=proj, generator=draw).double()
                    out = favor.attention(q, k, v, fm)
                    per.setdefault((proj, kernel, m), []).append(float(((out - exact) ** 2).mean()))
                    done += 1
                    if progress is not None:
                        progress(done, total)
    rows = []
    for (proj, kernel, m), errs in per.items():
        rows.append(
            {
                "projection": proj,
                "kernel": kernel,
                "M": m,
                "mse": statistics.fmean(errs),
                "std": statistics.stdev(errs) if len(errs) > 1 else 0.0,
                "per_input": errs,
            }
        )
    # the uniform-attention baseline: what an estimator that learned nothing would score
    baseline = []
    for i in range(inputs):
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        q, k, v = (input_std * torch.randn(length, dim, generator=gen, dtype=torch.float64) for _ in range(3))
        exact = favor.softmax_attention(q, k, v)
        baseline.append(float(((v.mean(0, keepdim=True) - exact) ** 2).mean()))
    return {
        "length": length,
        "dim": dim,
        "inputs": inputs,
        "input_std": input_std,
        "num_features": list(num_features),
        "rows": rows,
        "uniform_baseline_mse": statistics.fmean(baseline),
    }


def _lookup(res: dict) -> dict[tuple[str, str, int], dict]:
    return {(r["projection"], r["kernel"], r["M"]): r for r in res["rows"]}


def findings(res: dict) -> dict:
    """The paper's two claims, checked at every M: orthogonal (and simplex) below iid, per
    feature map; positive below trig, per projection. Values are the fraction of M where
    the claim holds and the geometric-mean error ratio."""
    rows = _lookup(res)
    ms = res["num_features"]
    kernels = sorted({r["kernel"] for r in res["rows"]})
    projs = sorted({r["projection"] for r in res["rows"]})
    out: dict = {}

    def compare(a_key, b_key):
        ratios = [rows[a_key(m)]["mse"] / rows[b_key(m)]["mse"] for m in ms]
        return {
            "holds_at": sum(r < 1 for r in ratios) / len(ratios),
            "geo_mean_ratio": math.exp(statistics.fmean(math.log(r) for r in ratios)),
        }

    for other in ("orthogonal", "simplex"):
        if other in projs and "iid" in projs:
            for kern in kernels:
                out[f"{other}<iid/{kern}"] = compare(
                    lambda m, k=kern, o=other: (o, k, m), lambda m, k=kern: ("iid", k, m)
                )
    if "positive" in kernels and "trig" in kernels:
        for proj in projs:
            out[f"positive<trig/{proj}"] = compare(
                lambda m, p=proj: (p, "positive", m), lambda m, p=proj: (p, "trig", m)
            )
    return out


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kernels = list(dict.fromkeys(r["kernel"] for r in results[0]["rows"]))
    fig, axes = plt.subplots(
        len(results), len(kernels), figsize=(3.6 * len(kernels), 3.4 * len(results)), squeeze=False
    )
    for row, res in zip(axes, results, strict=True):
        rows = _lookup(res)
        projs = list(dict.fromkeys(r["projection"] for r in res["rows"]))
        ms = res["num_features"]
        for ax, kernel in zip(row, kernels, strict=True):
            for proj in projs:
                mse = [rows[(proj, kernel, m)]["mse"] for m in ms]
                std = [rows[(proj, kernel, m)]["std"] for m in ms]
                ax.errorbar(ms, mse, yerr=std, marker="o", ms=3, capsize=2, label=proj)
            ax.axhline(res["uniform_baseline_mse"], color="grey", ls=":", lw=1, label="uniform attention")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{kernel}, input std {res['input_std']:g}", fontsize=9)
            ax.set_xlabel("M (projection rows)")
        row[0].set_ylabel(f"output MSE vs softmax (L={res['length']}, D={res['dim']})", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_arguments(parser) -> None:
    parser.add_argument("--length", type=int, default=None, help="L (default 4096, quick 512)")
    parser.add_argument("--inputs", type=int, default=None, help="random inputs (default 15, quick 3)")
    parser.add_argument(
        "--input-std",
        type=float,
        nargs="+",
        default=None,
        help="std of the q, k, v entries, one sweep each (default 0.5 1.0, quick 0.5)",
    )
    parser.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    t0 = time.perf_counter()
    if args.quick:
        kw = dict(length=args.length or 512, inputs=args.inputs or 3, num_features=(16, 64, 256))
        stds = args.input_std or [0.5]
    else:
        kw = dict(length=args.length or 4096, inputs=args.inputs or 15)
        stds = args.input_std or [0.5, 1.0]
    results = []
    with tqdm(total=None, desc=NAME, disable=args.quick) as bar:
        for std in stds:

            def progress(done, total, std=std):
                bar.set_postfix(input_std=std)
                bar.total = total
                bar.update(done - bar.n)

            bar.reset()
            res = feature_error(input_std=std, seed=args.seed, progress=progress, **kw)
            res["findings"] = findings(res)
            results.append(res)
    wall = time.perf_counter() - t0
    table = ""
    for res in results:
        table += f"### input std {res['input_std']:g} (L={res['length']}, D={res['dim']}, {res['inputs']} inputs)\n\n"
        table += markdown_table(
            ["projection", "kernel", "M", "output MSE", "std over inputs"],
            [[r["projection"], r["kernel"], r["M"], r["mse"], r["std"]] for r in res["rows"]],
        )
        table += f"\nuniform-attention baseline MSE: {res['uniform_baseline_mse']:.4g}\n\n"
        table += markdown_table(
            ["claim / feature map or projection", "holds at (fraction of M)", "geometric-mean MSE ratio"],
            [[k, v["holds_at"], v["geo_mean_ratio"]] for k, v in res["findings"].items()],
        )
        table += "\n"
    out = Path(args.out)
    paths = write_outputs(out, NAME, {"wall_s": wall, "sweeps": results}, table)
    _plot(results, out / f"{NAME}.png")
    print(table)
    print(f"wrote {paths['json']}, {paths['md']}, {out / (NAME + '.png')} in {wall:.1f} s")
    return 0
