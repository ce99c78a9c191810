"""Random features vs exact softmax: the error falls like 1/sqrt(M)."""

import math

import pytest
import torch

import favor
from tests.conftest import randn


@pytest.mark.parametrize("kernel", ["positive", "oprf", "hyperbolic"])
def test_error_falls_like_one_over_sqrt_m(kernel):
    gen = torch.Generator().manual_seed(0)
    d = 16
    q, k, v = randn(gen, 2, 48, d, std=0.5), randn(gen, 2, 48, d, std=0.5), randn(gen, 2, 48, d)
    exact = favor.softmax_attention(q, k, v)
    ms = [64, 256, 1024, 4096]
    errors = []
    for m in ms:
        # the mean relative error over 6 independent projections (fixed seeds)
        errs = []
        for seed in range(6):
            fm = favor.FeatureMap(kernel, dim=d, num_features=m, generator=torch.Generator().manual_seed(seed))
            out = favor.attention(q, k, v, fm)
            errs.append(((out - exact).norm() / exact.norm()).item())
        errors.append(sum(errs) / len(errs))
    x = torch.tensor([math.log(m) for m in ms])
    y = torch.tensor([math.log(e) for e in errors])
    slope = (((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()).item()
    # Monte Carlo error ~ M^-1/2 (slope -0.5 on log-log). At M <= 256 the ratio estimator is
    # not yet asymptotic (measured slopes -0.39..-0.5 here), and orthogonal coupling can
    # steepen it; [-0.7, -0.35] still rejects a stuck error (an eps floor gives ~0).
    assert -0.7 < slope < -0.35, (errors, slope)
    assert errors[-1] < 0.05
