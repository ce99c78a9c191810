"""FeatureMap: a kernel name plus its projection matrix, held as a persistent buffer."""

from __future__ import annotations

import math

import torch
from torch import nn

from . import maps
from .buffer_flags import buffer_flag
from .official import positive_official, trig_official
from .projections import NORMS, PROJECTIONS

__all__ = ["FeatureMap", "KERNELS", "STABILIZERS", "default_num_features"]

#: kernel name -> (needs a projection, features per projection row, estimates exp(x.y))
KERNELS = {
    "positive": (True, 1, True),
    "hyperbolic": (True, 2, True),
    "trig": (True, 2, True),
    "oprf": (True, 1, True),
    "relu": (True, 1, False),
    "elu": (False, 1, False),
}
STABILIZERS = ("exact", "official")
_OFFICIAL_KERNELS = ("positive", "trig", "relu")
_DEFAULT_EPS = {"relu": 1e-3}
_OFFICIAL_EPS = 1e-6


def default_num_features(dim: int) -> int:
    """M = round(D ln D), the paper's choice (Theorem 4: M = Theta(D log D))."""
    return max(1, round(dim * math.log(dim))) if dim > 1 else 1


class FeatureMap(nn.Module):
    """phi for one kernel. ``projection`` is "orthogonal", "iid", "simplex" or an explicit
    (M, D) tensor; the matrix is the persistent buffer ``projection``, so a saved and
    reloaded map computes exactly what was saved. ``redraw(generator)`` draws a new one.

    ``rho`` (FAVOR++ only) fixes the statistic that picks A*; when None, bidirectional
    attention takes it from the queries and keys, and causal attention uses 2/sqrt(D), the
    value for unit-variance q and k scaled by D^-1/4, because statistics of the sequence
    would let early outputs depend on later keys. Set it (or ``calibrate_rho``) for your data.
    """

    projection: torch.Tensor | None
    rho: torch.Tensor

    def __init__(
        self,
        kernel: str,
        *,
        dim: int | None = None,
        num_features: int | None = None,
        projection: str | torch.Tensor = "orthogonal",
        norm: str = "chi",
        generator: torch.Generator | None = None,
        eps: float | None = None,
        stabilizer: str = "exact",
        rho: float | None = None,
    ) -> None:
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {sorted(KERNELS)}, got {kernel!r}")
        if stabilizer not in STABILIZERS:
            raise ValueError(f"stabilizer must be one of {STABILIZERS}, got {stabilizer!r}")
        if stabilizer == "official" and kernel not in _OFFICIAL_KERNELS:
            raise ValueError(f"stabilizer='official' exists for kernels {_OFFICIAL_KERNELS}, got kernel={kernel!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.kernel = kernel
        self.stabilizer = stabilizer
        self.norm = norm
        default_eps = _OFFICIAL_EPS if stabilizer == "official" and kernel != "relu" else _DEFAULT_EPS.get(kernel, 0.0)
        self.eps = float(default_eps if eps is None else eps)
        if self.eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        self.register_buffer("rho", torch.tensor(float("nan") if rho is None else float(rho), dtype=torch.float64))
        needs_projection, _, _ = KERNELS[kernel]
        if not needs_projection:
            if not isinstance(projection, str) or num_features is not None:
                raise ValueError(f"kernel {kernel!r} is deterministic: it takes no projection or num_features")
            self.dim = dim
            self.projection_kind = None
            self.register_buffer("projection", None)
            return
        if isinstance(projection, torch.Tensor):
            if projection.ndim != 2 or projection.shape[0] < 1 or projection.shape[1] < 1:
                raise ValueError(
                    f"projection must be an (M, D) tensor with M, D >= 1, got shape {tuple(projection.shape)}"
                )
            if dim is not None and projection.shape[1] != dim:
                raise ValueError(f"projection has D={projection.shape[1]} columns but dim={dim}")
            if num_features is not None and projection.shape[0] != num_features:
                raise ValueError(f"projection has M={projection.shape[0]} rows but num_features={num_features}")
            self.dim = projection.shape[1]
            self.projection_kind = "explicit"
            self.register_buffer("projection", projection.detach().clone())
            return
        if projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {sorted(PROJECTIONS)} or an (M, D) tensor, got {projection!r}")
        if dim is None:
            raise ValueError(f"FeatureMap({kernel!r}) needs dim= (the head dimension D) to draw its projection")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        m = default_num_features(dim) if num_features is None else num_features
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"num_features must be a positive int (M >= 1), got {num_features!r}")
        self.dim = dim
        self.projection_kind = projection
        self.register_buffer("projection", PROJECTIONS[projection](m, dim, norm=norm, generator=generator))

    # -- shape facts ---------------------------------------------------------------------
    @property
    def num_features(self) -> int | None:
        """M, the number of projection rows (None for deterministic kernels)."""
        return None if self.projection is None else self.projection.shape[0]

    @property
    def num_outputs(self) -> int | None:
        """M', the length of phi(x): 2M for trig/hyperbolic, M otherwise, D for elu."""
        if self.projection is None:
            return self.dim
        return self.projection.shape[0] * KERNELS[self.kernel][1]

    @property
    def is_softmax(self) -> bool:
        """True when phi(x).phi(y) estimates exp(x.y)."""
        return KERNELS[self.kernel][2]

    def extra_repr(self) -> str:
        return f"{self.kernel!r}, dim={self.dim}, num_features={self.num_features}, projection={self.projection_kind!r}, stabilizer={self.stabilizer!r}"

    # -- randomness ----------------------------------------------------------------------
    @torch.no_grad()
    def redraw(self, generator: torch.Generator | None = None) -> None:
        """Draw a new projection of the same kind and shape, in place."""
        if self.projection is None:
            return
        if self.projection_kind == "explicit":
            raise ValueError(
                "this FeatureMap was given an explicit projection matrix; it has no distribution to redraw from"
            )
        m, d = self.projection.shape
        new = PROJECTIONS[self.projection_kind](m, d, norm=self.norm, generator=generator)
        self.projection.copy_(new.to(self.projection.dtype))

    def has_fixed_rho(self) -> bool:
        """Whether FAVOR++'s rho is set (not NaN); read from the buffer once per change."""
        return buffer_flag(self, "rho", self.rho, lambda r: ~torch.isnan(r))

    @torch.no_grad()
    def calibrate_rho(self, q: torch.Tensor, k: torch.Tensor) -> float:
        """Fix FAVOR++'s rho from already-scaled sample queries and keys (all rows count)."""
        # host sync: calibration, once per fit; the float is what it returns
        rho = float(maps.oprf_rho(q.double().reshape(-1, q.shape[-1]), k.double().reshape(-1, k.shape[-1])))
        self.rho.fill_(rho)
        return rho

    # -- features ------------------------------------------------------------------------
    def _w(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection.to(device=x.device, dtype=x.dtype)

    def check_dim(self, x: torch.Tensor, name: str) -> None:
        """Raise ValueError, naming ``name``, if ``x``'s head dim is not the map's ``dim``."""
        if self.dim is not None and x.shape[-1] != self.dim:
            raise ValueError(f"{name} has head dim {x.shape[-1]} but the feature map was built for dim={self.dim}")

    def oprf_a(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        *,
        causal: bool = False,
        q_mask: torch.Tensor | None = None,
        k_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """A* for FAVOR++ with leading shape of q/k broadcast (...,)."""
        lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
        if self.has_fixed_rho():
            rho = self.rho.to(device=q.device, dtype=q.dtype).expand(lead)
        elif causal:
            rho = torch.full(lead, 2.0 / math.sqrt(q.shape[-1]), dtype=q.dtype, device=q.device)
        else:
            rho = maps.oprf_rho(q, k, x_mask=q_mask, y_mask=k_mask).expand(lead)
        return maps.oprf_a(rho)

    def exact_features(self, x: torch.Tensor, a: torch.Tensor | None = None) -> maps.Features:
        """phi(x) as (values, log_scale) with favor's exact numerics; ``a`` is A* for oprf."""
        kernel = self.kernel
        if kernel == "elu":
            return maps.elu(x)
        w = self._w(x)
        if kernel == "relu":
            return maps.relu(x, w, self.eps)
        if kernel == "oprf":
            if a is None:
                raise ValueError("oprf features need A (see FeatureMap.oprf_a)")
            return maps.oprf(x, w, a)
        return {"positive": maps.positive, "hyperbolic": maps.hyperbolic, "trig": maps.trig}[kernel](x, w)

    def pair(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        *,
        causal: bool = False,
        q_mask: torch.Tensor | None = None,
        k_mask: torch.Tensor | None = None,
    ) -> tuple[maps.Features, maps.Features]:
        """Features of already-scaled queries and keys under this map's stabilizer.

        Masks are bool (..., L), True for padding; they only matter for statistics taken
        over the sequence (FAVOR++'s rho, the official key max). Padded rows are removed
        by the attention paths, not here.
        """
        self.check_dim(q, "q")
        self.check_dim(k, "k")
        if self.stabilizer == "official" and self.kernel != "relu":
            w = self._w(q)
            if self.kernel == "trig":
                return trig_official(q, w, mask=q_mask), trig_official(k, w, mask=k_mask)
            return (
                positive_official(q, w, is_query=True, eps=self.eps),
                positive_official(k, w, is_query=False, eps=self.eps, mask=k_mask),
            )
        a = self.oprf_a(q, k, causal=causal, q_mask=q_mask, k_mask=k_mask) if self.kernel == "oprf" else None
        return self.exact_features(q, a), self.exact_features(k, a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """phi(x) explicitly (..., L, M'), on x as given. FAVOR++ takes rho from the buffer
        or else from x itself. Large inputs can overflow: attention never calls this."""
        self.check_dim(x, "x")
        a = self.oprf_a(x, x) if self.kernel == "oprf" else None
        return self.exact_features(x, a).explicit()

    def estimate_kernel(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """phi(x_i).phi(y_j) for every pair, (..., Lx, Ly), on x and y as given (no scaling,
        no stabiliser): for the softmax kernels an unbiased estimate of exp(x_i.y_j)."""
        self.check_dim(x, "x")
        self.check_dim(y, "y")
        a = self.oprf_a(x, y) if self.kernel == "oprf" else None
        fx, fy = self.exact_features(x, a), self.exact_features(y, a)
        out = fx.values @ fy.values.transpose(-1, -2)
        if fx.log_scale is not None:
            out = out * torch.exp(fx.log_scale[..., :, None] + fy.log_scale[..., None, :])
        return out
