"""Random projection matrices W (M, D) whose rows are the random features' directions.

Every constructor draws in float64 from the given ``torch.Generator`` (or torch's default
generator when ``None``, as ``torch.randn`` does) and returns ``dtype`` (default: torch's
default dtype). The same generator state always gives the same matrix.
"""

from __future__ import annotations

import math

import torch

__all__ = ["gaussian_iid", "gaussian_orthogonal", "simplex", "PROJECTIONS", "NORMS"]

NORMS = ("chi", "sqrt_d")


def _check_sizes(m: int, d: int) -> None:
    for name, value in (("m", m), ("d", d)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int (number of features / head dim), got {value!r}")


def _randn(*shape: int, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else "cpu"
    return torch.randn(*shape, generator=generator, dtype=torch.float64, device=device)


def _haar_orthogonal(n: int, d: int, generator: torch.Generator | None) -> torch.Tensor:
    """n independent Haar-distributed d x d orthogonal matrices (n, d, d), rows orthonormal."""
    # QR of a Gaussian matrix is Haar only after fixing the signs of R's diagonal; without
    # it (the official code) the first row of every block has a negative first coordinate.
    q, r = torch.linalg.qr(_randn(n, d, d, generator=generator))
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    signs[signs == 0] = 1.0
    return (q * signs[..., None, :]).transpose(-1, -2)


def _row_norms(m: int, d: int, norm: str, generator: torch.Generator | None) -> torch.Tensor:
    if norm == "chi":
        # The norm of a d-dim standard Gaussian vector: keeps every row's marginal N(0, I_d),
        # which is what makes the positive/trig estimators unbiased.
        return torch.linalg.vector_norm(_randn(m, d, generator=generator), dim=1)
    if norm == "sqrt_d":
        return torch.full((m,), math.sqrt(d), dtype=torch.float64)
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def _stack_blocks(m: int, d: int, blocks, generator) -> torch.Tensor:
    """ceil(m/d) blocks of d rows from ``blocks(n, d, generator) -> (n, d, d)``, first m rows."""
    return blocks(math.ceil(m / d), d, generator).reshape(-1, d)[:m]


def _out(w: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return w.to(dtype or torch.get_default_dtype())


def gaussian_iid(
    m: int, d: int, *, generator: torch.Generator | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """(m, d) matrix of independent N(0, 1) entries."""
    _check_sizes(m, d)
    return _out(_randn(m, d, generator=generator), dtype)


def gaussian_orthogonal(
    m: int,
    d: int,
    *,
    norm: str = "chi",
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Blocks of d Haar-orthonormal rows (ceil(m/d) blocks, last one truncated).

    ``norm="chi"`` gives each row the norm of an independent d-dim Gaussian vector (so each
    row is marginally N(0, I_d)); ``norm="sqrt_d"`` gives every row norm sqrt(d) (the
    paper's regularised variant).
    """
    _check_sizes(m, d)
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    directions = _stack_blocks(m, d, _haar_orthogonal, generator)
    return _out(directions * _row_norms(m, d, norm, generator)[:, None], dtype)


def _simplex_blocks(n: int, d: int, generator: torch.Generator | None) -> torch.Tensor:
    # Centred basis vectors e_i - 1/d, normalised: d unit vectors with pairwise inner
    # product -1/(d-1), then one Haar rotation per block.
    s = torch.eye(d, dtype=torch.float64) - 1.0 / d
    s = s / torch.linalg.vector_norm(s, dim=1, keepdim=True)
    return s @ _haar_orthogonal(n, d, generator)


def simplex(
    m: int, d: int, *, generator: torch.Generator | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Simplex random features (Reid et al., ICML 2023): per block of d rows, unit
    directions with pairwise inner product -1/(d-1) under a random rotation, chi_d norms."""
    _check_sizes(m, d)
    if d < 2:
        raise ValueError(f"simplex projections need d >= 2 (a simplex in d dims), got d={d}")
    directions = _stack_blocks(m, d, _simplex_blocks, generator)
    return _out(directions * _row_norms(m, d, "chi", generator)[:, None], dtype)


def _orthogonal(m, d, *, norm="chi", generator=None, dtype=None):
    return gaussian_orthogonal(m, d, norm=norm, generator=generator, dtype=dtype)


def _iid(m, d, *, norm="chi", generator=None, dtype=None):
    if norm != "chi":
        raise ValueError(f"norm={norm!r} applies to orthogonal projections only; iid rows are Gaussian")
    return gaussian_iid(m, d, generator=generator, dtype=dtype)


def _simplex(m, d, *, norm="chi", generator=None, dtype=None):
    if norm != "chi":
        raise ValueError(f"norm={norm!r} is not supported for simplex projections (chi norms only)")
    return simplex(m, d, generator=generator, dtype=dtype)


#: name -> constructor(m, d, *, norm, generator, dtype), as accepted by FeatureMap(projection=...)
PROJECTIONS = {"orthogonal": _orthogonal, "iid": _iid, "simplex": _simplex}
