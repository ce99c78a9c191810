"""favor paper mse-ratio: Fig. 2, the MSE ratio of the trigonometric and positive
softmax-kernel estimators, closed form (Lemma 2) against favor's features by Monte Carlo.

x and y have a common length l and the angle phi between them. With iid Gaussian
projections and m features (Lemma 2):

    MSE(trig)     = 1/(2m) exp(|x|^2 + |y|^2) (1 - exp(-|x - y|^2))^2
    MSE(positive) = 1/m exp(|x + y|^2) SM(x, y)^2 (1 - exp(-|x + y|^2)),  SM = exp(x.y)

and r = MSE(trig) / MSE(positive) does not depend on m. The Monte Carlo side draws
``draws`` independent m-feature maps (favor.FeatureMap, projection="iid") per kernel and
averages the squared errors of phi(x).phi(y). Its standard error is known in closed form
too (the estimators' fourth moments: lognormal for positive, cosines for trig), so the
agreement check needs no guess: a grid point is "checked" when the predicted relative
standard error of its measured ratio is at most ``max_rel_se``. For the positive estimator
that error grows like exp(2|x + y|^2) / sqrt(draws), so points with large l and small
angle cannot be measured by sampling at all; they are plotted from the closed form only.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..features.feature_map import FeatureMap
from .report import markdown_table, write_outputs

__all__ = ["mse_closed_form", "mse_monte_carlo", "mse_ratio_figure", "add_arguments", "run"]

NAME = "mse-ratio"


def _pair(length: float, angle: float) -> tuple[float, float, float]:
    """(|x|^2 + |y|^2, |x - y|^2, |x + y|^2, x.y) for |x| = |y| = |l| at angle phi."""
    sq = length * length
    dot = sq * math.cos(angle)
    return 2 * sq, 2 * sq - 2 * dot, 2 * sq + 2 * dot, dot


def mse_closed_form(length: float, angle: float, m: int) -> dict[str, float]:
    """Lemma 2's MSEs of the m-feature trig and positive estimators of exp(x.y), and their
    ratio r: inf where only the positive estimator is exact (x = -y), nan where both are
    (x = y = 0)."""
    norms, diff, summ, dot = _pair(length, angle)
    trig = math.exp(norms) * (-math.expm1(-diff)) ** 2 / (2 * m)
    positive = math.exp(summ + 2 * dot) * (-math.expm1(-summ)) / m
    if positive > 0:
        ratio = trig / positive
    else:
        ratio = float("inf") if trig > 0 else float("nan")
    return {"trig": trig, "positive": positive, "ratio": ratio}


def _single_moments(kernel: str, length: float, angle: float) -> tuple[float, float, float, float]:
    """Mean and 2nd-4th central moments of ONE feature's estimate Y of exp(x.y).

    positive: Y = exp(w.(x+y) - (|x|^2+|y|^2)/2), E Y^k = exp(k^2 |x+y|^2 / 2 - k (|x|^2+|y|^2)/2).
    trig: Y = exp((|x|^2+|y|^2)/2) cos(w.(x-y)), and E cos(j t) = exp(-j^2 |x-y|^2 / 2)."""
    norms, diff, summ, _ = _pair(length, angle)
    if kernel == "positive":
        raw = [math.exp(k * k * summ / 2 - k * norms / 2) for k in (1, 2, 3, 4)]
    else:
        c = [math.exp(-j * j * diff / 2) for j in range(5)]  # E cos(j t)
        cos_pow = [
            c[1],
            (1 + c[2]) / 2,
            (3 * c[1] + c[3]) / 4,
            (3 + 4 * c[2] + c[4]) / 8,
        ]
        raw = [math.exp(k * norms / 2) * cos_pow[k - 1] for k in (1, 2, 3, 4)]
    mu = raw[0]
    var = raw[1] - mu**2
    mu3 = raw[2] - 3 * mu * raw[1] + 2 * mu**3
    mu4 = raw[3] - 4 * mu * raw[2] + 6 * mu**2 * raw[1] - 3 * mu**4
    return mu, max(var, 0.0), mu3, max(mu4, 0.0)


def _mse_standard_error(kernel: str, length: float, angle: float, m: int, draws: int) -> float:
    """Standard error of the mean of ``draws`` squared errors of the m-feature estimator:
    the mean of m iid Y has variance var/m and fourth central moment (mu4 + 3(m-1) var^2)/m^3."""
    _, var, _, mu4 = _single_moments(kernel, length, angle)
    mse = var / m
    fourth = (mu4 + 3 * (m - 1) * var * var) / m**3
    return math.sqrt(max(fourth - mse * mse, 0.0) / draws)


def mse_monte_carlo(length: float, angle: float, *, m: int, draws: int, dim: int = 2, seed: int = 0) -> dict:
    """favor's measured MSEs and ratio at one point: ``draws`` independent m-feature
    maps per kernel (iid projections), phi(x).phi(y) against exp(x.y), x and y in R^dim
    (any dim >= 2 gives the same law: iid rows enter only through w.x and w.y).

    All draws are one FeatureMap of m * draws rows whose features are summed in groups of
    m (iid rows: each group is an independent m-feature map); the sums are rescaled by
    sqrt(M/m) twice, from the map's 1/sqrt(M) to 1/sqrt(m). Also returns the predicted
    standard errors of both MSEs and of the ratio (delta method, independent draws)."""
    if dim < 2:
        raise ValueError(f"dim must be >= 2 (x and y span a plane), got {dim}")
    x = torch.zeros(dim, dtype=torch.float64)
    y = torch.zeros(dim, dtype=torch.float64)
    x[0] = length
    y[0], y[1] = length * math.cos(angle), length * math.sin(angle)
    exact = math.exp(float(x @ y))
    out: dict[str, Any] = {"l": length, "phi": angle, "m": m, "draws": draws}
    for i, kernel in enumerate(("trig", "positive")):
        gen = torch.Generator().manual_seed(seed * 2 + i)
        fm = FeatureMap(kernel, dim=dim, num_features=m * draws, projection="iid", generator=gen).double()
        fx, fy = fm(x[None])[0], fm(y[None])[0]  # (M',) each, with the 1/sqrt(M) factor
        prod = (fx * fy).view(-1, draws, m)  # (2, draws, m) for trig's [cos, sin], (1, draws, m)
        estimates = prod.sum((0, 2)) * draws  # M/m = draws: 1/M -> 1/m
        sq = (estimates - exact) ** 2
        out[kernel] = float(sq.mean())
        out[f"{kernel}_se"] = _mse_standard_error(kernel, length, angle, m, draws)
    out["ratio"] = out["trig"] / out["positive"]
    rel = math.hypot(out["trig_se"] / max(out["trig"], 1e-300), out["positive_se"] / out["positive"])
    out["ratio_rel_se"] = rel
    return out


def mse_ratio_figure(
    *,
    angles: int = 201,
    lengths: int = 201,
    mc_angles: tuple[float, ...] = (),
    mc_lengths: tuple[float, ...] = (),
    m: int = 16,
    draws: int = 200_000,
    max_rel_se: float = 0.05,
    seed: int = 0,
    progress=None,
) -> dict:
    """The closed-form ratio on an ``angles`` x ``lengths`` grid over [-pi, pi] x [-2, 2], its
    slice at l = 1, and favor's Monte Carlo ratio at every (phi, l) of mc_angles x mc_lengths.
    Points whose predicted relative standard error exceeds ``max_rel_se`` are kept but
    marked unchecked (``checked: False``)."""
    if angles < 2 or lengths < 2:
        raise ValueError(f"angles and lengths must be >= 2, got {angles}, {lengths}")
    phis = [-math.pi + 2 * math.pi * i / (angles - 1) for i in range(angles)]
    ls = [-2 + 4 * j / (lengths - 1) for j in range(lengths)]
    grid = [[mse_closed_form(length, phi, m)["ratio"] for phi in phis] for length in ls]
    slice_l1 = [mse_closed_form(1.0, phi, m)["ratio"] for phi in phis]
    points = []
    pairs = [(phi, length) for length in mc_lengths for phi in mc_angles]
    for k, (phi, length) in enumerate(pairs):
        mc = mse_monte_carlo(length, phi, m=m, draws=draws, seed=seed + k)
        cf = mse_closed_form(length, phi, m)
        mc["closed_form"] = cf
        se = cf["ratio"] * mc["ratio_rel_se"]
        # an estimator that is exact there (trig at phi = 0) has r = 0 and no sampling
        # error to compare against: kept, not checked
        mc["checked"] = bool(se > 0 and mc["ratio_rel_se"] <= max_rel_se)
        # deviation in units of the predicted standard error of the measured ratio
        mc["z"] = (mc["ratio"] - cf["ratio"]) / se if se > 0 else float("nan")
        points.append(mc)
        if progress is not None:
            progress(k + 1, len(pairs))
    return {
        "m": m,
        "draws": draws,
        "max_rel_se": max_rel_se,
        "phi": phis,
        "l": ls,
        "ratio_closed_form": grid,
        "slice_l1": slice_l1,
        "monte_carlo": points,
    }


def _plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phi, ls = np.array(res["phi"]), np.array(res["l"])
    # r is infinite at phi = +-pi (x = -y: the positive estimator is exact) and 0 at phi = 0
    grid = np.nan_to_num(np.array(res["ratio_closed_form"]), nan=1.0, posinf=1e12)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    im = a.pcolormesh(phi, ls, np.log10(np.clip(grid, 1e-12, 1e12)), shading="auto", cmap="viridis")
    fig.colorbar(im, ax=a, label="log10 r = MSE(trig) / MSE(positive)")
    a.contour(phi, ls, np.log10(np.clip(grid, 1e-12, 1e12)), levels=[0.0], colors="w", linewidths=1)
    for p in res["monte_carlo"]:
        a.plot(p["phi"], p["l"], "o" if p["checked"] else "x", color="r", ms=4)
    a.set_xlabel("angle phi")
    a.set_ylabel("length l")
    a.set_title("closed form (white: r = 1); red: Monte Carlo points")
    b.semilogy(phi, res["slice_l1"], label="closed form, l = 1")
    # r = 0 at phi = 0 (trig exact) has no place on a log axis
    mc = [p for p in res["monte_carlo"] if p["l"] == 1.0 and p["closed_form"]["ratio"] > 0]
    if mc:
        b.errorbar(
            [p["phi"] for p in mc],
            [p["ratio"] for p in mc],
            yerr=[2 * p["ratio"] * p["ratio_rel_se"] for p in mc],
            fmt="o",
            label="favor, Monte Carlo (2 s.e.)",
        )
    b.set_xlabel("angle phi")
    b.set_ylabel("r")
    b.set_ylim(1e-6, None)
    b.set_title("slice at l = 1")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table_of(res: dict) -> str:
    """The Monte Carlo points as a markdown table (z: deviation in predicted s.e.)."""
    rows = [
        [
            f"{p['phi']:.3f}",
            p["l"],
            p["closed_form"]["ratio"],
            p["ratio"],
            "n/a" if p["closed_form"]["ratio"] == 0 else f"{100 * p['ratio_rel_se']:.1f} %",
            f"{p['z']:+.2f}",
            "yes"
            if p["checked"]
            else (
                "no (trig exact, r = 0)"
                if p["closed_form"]["ratio"] == 0
                else f"no (s.e. > {100 * res['max_rel_se']:g} %)"
            ),
        ]
        for p in res["monte_carlo"]
    ]
    return markdown_table(["phi", "l", "r closed form", "r favor (MC)", "rel. s.e.", "z", "checked"], rows)


def add_arguments(parser) -> None:
    parser.add_argument("--m", type=int, default=16, help="random features per estimator (r does not depend on it)")
    parser.add_argument(
        "--draws", type=int, default=None, help="Monte Carlo draws per point (default 200000, quick 20000)"
    )
    parser.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    t0 = time.perf_counter()
    if args.quick:
        kw = dict(angles=41, lengths=21, mc_angles=(math.pi / 4, math.pi / 2, 3 * math.pi / 4), mc_lengths=(0.5, 1.0))
        draws = args.draws or 20_000
    else:
        kw = dict(
            # phi = +-pi left out: there x = -y, the positive estimator is exact and r = inf
            mc_angles=tuple(-math.pi + math.pi * i / 4 for i in range(1, 8)),
            mc_lengths=(-1.0, -0.5, 0.5, 1.0, 1.5),
        )
        draws = args.draws or 200_000
    res = mse_ratio_figure(m=args.m, draws=draws, seed=args.seed, **kw)
    res["wall_s"] = time.perf_counter() - t0
    table = table_of(res)
    out = Path(args.out)
    paths = write_outputs(out, NAME, res, table)
    _plot(res, out / f"{NAME}.png")
    print(table)
    print(f"wrote {paths['json']}, {paths['md']}, {out / (NAME + '.png')} in {res['wall_s']:.1f} s")
    return 0
