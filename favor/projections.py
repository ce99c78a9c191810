"""``favor.projections``: random projection matrices (see favor.features.projections)."""

from .features.projections import NORMS, PROJECTIONS, gaussian_iid, gaussian_orthogonal, simplex

__all__ = ["gaussian_iid", "gaussian_orthogonal", "simplex", "PROJECTIONS", "NORMS"]
