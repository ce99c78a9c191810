"""How well each kernel approximates exact softmax attention: the demo's first table.

Relative error |out - exact| / |exact| (Frobenius) next to the uniform-attention baseline
(every query averages all values): an estimator that collapses toward uniform attention,
as an eps floor makes it do, shows an error equal to that baseline.
"""

from __future__ import annotations

import torch

from ..features import FeatureMap
from ..ops import attention, softmax_attention

__all__ = ["approximation_table", "DEMO_KERNELS"]

DEMO_KERNELS = ("positive", "oprf", "hyperbolic", "trig", "relu", "elu")


def _inputs(logit_std: float, *, batch: int, heads: int, length: int, dim: int, generator: torch.Generator):
    # q, k ~ N(0, s^2 I) with s^2 = logit_std: q.k / sqrt(D) then has std logit_std
    s = logit_std**0.5
    q = torch.randn(batch, heads, length, dim, generator=generator) * s
    k = torch.randn(batch, heads, length, dim, generator=generator) * s
    v = torch.randn(batch, heads, length, dim, generator=generator)
    return q, k, v


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def approximation_table(
    *,
    kernels: tuple[str, ...] = DEMO_KERNELS,
    num_features: tuple[int, ...] = (64, 256, 1024),
    logit_stds: tuple[float, ...] = (0.25, 0.5),
    causal: bool = False,
    length: int = 1024,
    dim: int = 64,
    heads: int = 4,
    seed: int = 0,
) -> list[dict]:
    """One row per (logit std, kernel, M): relative error vs exact softmax attention, and
    the uniform-attention baseline for the same inputs. Float32, fixed seeds."""
    rows = []
    for logit_std in logit_stds:
        q, k, v = _inputs(
            logit_std, batch=1, heads=heads, length=length, dim=dim, generator=torch.Generator().manual_seed(seed)
        )
        exact = softmax_attention(q, k, v, causal=causal)
        uniform = softmax_attention(torch.zeros_like(q), k, v, causal=causal)
        for kernel in kernels:
            for m in num_features if kernel != "elu" else (None,):
                g = torch.Generator().manual_seed(seed + 1)
                fm = (
                    FeatureMap(kernel, dim=dim, num_features=m, generator=g)
                    if kernel != "elu"
                    else FeatureMap("elu", dim=dim)
                )
                out = attention(q, k, v, fm, causal=causal)
                rows.append(
                    {
                        "logit_std": logit_std,
                        "kernel": kernel,
                        "num_features": m,
                        "rel_error": _rel(out, exact),
                        "uniform_baseline": _rel(uniform, exact),
                        "finite": bool(torch.isfinite(out).all()),
                    }
                )
    return rows
