import math

import pytest
import torch

import favor
from favor.features import maps
from tests.conftest import randn

D, M = 8, 16


def _fm(kernel, gen, **kw):
    return favor.FeatureMap(kernel, dim=D, num_features=M, generator=gen, **kw)


def _direct(kernel, x, w, eps=1e-3, a=None):
    """The paper's formulas, written out with no shifts (float64, small inputs)."""
    s = x @ w.T
    half = 0.5 * (x * x).sum(-1, keepdim=True)
    m = w.shape[0]
    table = {
        "positive": lambda: torch.exp(s - half) / math.sqrt(m),
        "hyperbolic": lambda: torch.exp(-half) / math.sqrt(2 * m) * torch.cat([torch.exp(s), torch.exp(-s)], -1),
        "trig": lambda: torch.exp(half) / math.sqrt(m) * torch.cat([torch.cos(s), torch.sin(s)], -1),
        "relu": lambda: torch.relu(s) + eps,
        "elu": lambda: torch.nn.functional.elu(x) + 1,
        "oprf": lambda: (
            (1 - 4 * a) ** (x.shape[-1] / 4)
            * torch.exp(a * (w * w).sum(-1) + math.sqrt(1 - 4 * a) * s - half)
            / math.sqrt(m)
        ),
    }
    return table[kernel]()


@pytest.mark.parametrize("kernel", ["positive", "hyperbolic", "trig", "relu", "elu"])
def test_features_match_the_formulas(gen, kernel):
    fm = _fm(kernel, gen) if kernel != "elu" else favor.FeatureMap("elu", dim=D)
    x = randn(gen, 3, 5, D, std=0.7)
    w = fm.projection.double() if fm.projection is not None else torch.eye(D, dtype=torch.float64)
    got = fm(x)
    assert torch.allclose(got, _direct(kernel, x, w), rtol=1e-12, atol=0)


def test_oprf_matches_the_formula_and_a_star(gen):
    fm = _fm("oprf", gen, rho=0.3)
    x = randn(gen, 5, D, std=0.7)
    a = maps.oprf_a(torch.tensor(0.3, dtype=torch.float64))
    assert a.item() < 0
    assert torch.allclose(fm(x), _direct("oprf", x, fm.projection.double(), a=a.item()), rtol=1e-12)
    # A* minimises d log(1-4A) - d/2 log(1-8A) + 2 d rho (1-4A)/(1-8A), the log second moment
    grid = torch.linspace(-0.5, 0.1, 60001, dtype=torch.float64)
    obj = D * torch.log(1 - 4 * grid) - D / 2 * torch.log(1 - 8 * grid) + 2 * D * 0.3 * (1 - 4 * grid) / (1 - 8 * grid)
    assert abs(grid[obj.argmin()].item() - a.item()) < 2e-5


def test_oprf_rho_is_the_mean_pair_norm(gen):
    x, y = randn(gen, 7, D), randn(gen, 5, D)
    pairs = (x[:, None, :] + y[None, :, :]).pow(2).sum(-1).mean() / D
    assert torch.allclose(maps.oprf_rho(x, y), pairs, rtol=1e-12)


@pytest.mark.parametrize("kernel", ["positive", "hyperbolic", "trig", "oprf", "relu", "elu"])
def test_large_inputs_stay_finite_in_the_attention_form(gen, kernel):
    # |Wx| ~ 100: exp would overflow float32; the (values, log_scale) form must not
    fm = _fm(kernel, gen) if kernel != "elu" else favor.FeatureMap("elu", dim=D)
    x = randn(gen, 4, D, std=30.0, dtype=torch.float32)
    a = fm.oprf_a(x, x) if kernel == "oprf" else None
    f = fm.exact_features(x, a)
    assert torch.isfinite(f.values).all()
    if f.log_scale is not None:
        assert torch.isfinite(f.log_scale).all()
        assert f.values.amax(-1).eq(1).all() if kernel != "trig" else f.values.abs().le(1).all()


def _estimates(fm, x, y, draws, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(draws):
        fm.redraw(g)
        out.append(fm.estimate_kernel(x, y))
    return torch.stack(out)  # (draws, Lx, Ly)


def _pairs(gen, std):
    x, y = randn(gen, 3, D, std=std), randn(gen, 3, D, std=std)
    return x, y, torch.exp(x @ y.T)


@pytest.mark.parametrize("kernel", ["positive", "hyperbolic", "trig", "oprf"])
@pytest.mark.parametrize("projection", ["iid", "orthogonal", "simplex"])
def test_softmax_kernels_are_unbiased(gen, kernel, projection):
    fm = favor.FeatureMap(kernel, dim=D, num_features=M, projection=projection, generator=gen).double()
    x, y, exact = _pairs(gen, 0.35)
    est = _estimates(fm, x, y, 1500, seed=11)
    stderr = est.std(0) / math.sqrt(est.shape[0])
    # a Monte Carlo mean is within 5 standard errors of its expectation (fixed seed)
    assert torch.all((est.mean(0) - exact).abs() < 5 * stderr + 1e-12), (est.mean(0) - exact) / stderr


def _lemma2_mse(kernel, x, y, m):
    s2 = (x[:, None] + y[None]).pow(2).sum(-1)
    d2 = (x[:, None] - y[None]).pow(2).sum(-1)
    sm = torch.exp(x @ y.T)
    if kernel == "positive":
        return torch.exp(s2) * sm**2 * (1 - torch.exp(-s2)) / m
    return torch.exp(s2) * sm**-2 * (1 - torch.exp(-d2)) ** 2 / (2 * m)


@pytest.mark.parametrize("kernel", ["positive", "trig"])
def test_mse_follows_lemma_2(gen, kernel):
    fm = favor.FeatureMap(kernel, dim=D, num_features=M, projection="iid", generator=gen).double()
    x, y, exact = _pairs(gen, 0.3)
    est = _estimates(fm, x, y, 4000, seed=5)
    sq = (est - exact) ** 2
    theory = _lemma2_mse(kernel, x, y, M)
    # the empirical MSE is a mean of 4000 squared errors: within 5 of its own standard
    # errors of the theory (heavy tails make a fixed relative band either loose or flaky)
    stderr = sq.std(0) / math.sqrt(sq.shape[0])
    assert torch.all((sq.mean(0) - theory).abs() < 5 * stderr), (sq.mean(0) - theory) / stderr
    # and it has teeth: summed over the pairs, the formula for M/2 features is rejected
    total_se = sq.sum((1, 2)).std() / math.sqrt(sq.shape[0])
    assert (sq.mean(0).sum() - 2 * theory.sum()).abs() > 5 * total_se


def test_orthogonal_beats_iid():
    # a pair with |x + y|^2 = 1 and M = D: the ORF gain is ~18 % there, while the Monte Carlo
    # MSE over 6000 draws has a ~4 % standard error; require a > 2.5-sigma gap (fixed seeds)
    x = torch.full((1, D), 0.5 / math.sqrt(D), dtype=torch.float64)
    exact = torch.exp(x @ x.T)
    mse, se = {}, {}
    for projection in ("iid", "orthogonal"):
        fm = favor.FeatureMap("positive", dim=D, num_features=D, projection=projection).double()
        sq = (_estimates(fm, x, x, 6000, seed=1) - exact) ** 2
        mse[projection], se[projection] = sq.mean(), sq.std() / math.sqrt(sq.numel())
    gap = (mse["iid"] - mse["orthogonal"]) / torch.sqrt(se["iid"] ** 2 + se["orthogonal"] ** 2)
    assert gap > 2.5, (mse, gap)


def test_oprf_has_lower_mse_than_positive_for_large_pairs(gen):
    # theory: FAVOR++'s variance advantage grows with |x + y|; at |x+y|^2 ~ 8 it is large
    x, y = randn(gen, 2, D, std=0.75), randn(gen, 2, D, std=0.75)
    y = y + x  # correlated pairs: large |x + y|
    exact = torch.exp(x @ y.T)
    mse = {}
    for kernel in ("positive", "oprf"):
        fm = favor.FeatureMap(kernel, dim=D, num_features=M, projection="iid", generator=gen).double()
        mse[kernel] = ((_estimates(fm, x, y, 2000, seed=3) - exact) ** 2).mean(0)
    assert torch.all(mse["oprf"] < 0.7 * mse["positive"]), mse


def test_state_dict_round_trip_and_redraw(gen):
    fm = _fm("positive", gen)
    sd = fm.state_dict()
    assert set(sd) == {"projection", "rho"}
    other = _fm("positive", torch.Generator().manual_seed(99))
    assert not torch.equal(other.projection, fm.projection)
    other.load_state_dict(sd)
    assert torch.equal(other.projection, fm.projection)
    before = fm.projection.clone()
    fm.redraw(torch.Generator().manual_seed(5))
    assert not torch.equal(before, fm.projection)
    fm2 = _fm("positive", gen)
    fm2.redraw(torch.Generator().manual_seed(5))
    assert torch.equal(fm2.projection, fm.projection)


def test_default_num_features_is_d_log_d():
    assert favor.default_num_features(64) == round(64 * math.log(64)) == 266
    assert favor.FeatureMap("positive", dim=64).num_features == 266
    assert favor.FeatureMap("trig", dim=8, num_features=5).num_outputs == 10


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(kernel="softmax", dim=4), ValueError, "kernel must be one of"),
        (dict(kernel="positive"), ValueError, "needs dim="),
        (dict(kernel="positive", dim=4, num_features=0), ValueError, "M >= 1"),
        (dict(kernel="positive", dim=4, projection="hadamard"), ValueError, "projection must be one of"),
        (dict(kernel="positive", dim=4, projection=torch.zeros(3)), ValueError, r"\(M, D\) tensor"),
        (dict(kernel="positive", dim=5, projection=torch.zeros(3, 4)), ValueError, "D=4 columns but dim=5"),
        (dict(kernel="positive", dim=4, stabilizer="max"), ValueError, "stabilizer must be one of"),
        (dict(kernel="oprf", dim=4, stabilizer="official"), ValueError, "stabilizer='official' exists for"),
        (dict(kernel="relu", dim=4, eps=-1.0), ValueError, "eps must be >= 0"),
        (dict(kernel="elu", dim=4, num_features=8), ValueError, "deterministic"),
    ],
)
def test_bad_construction(kwargs, err, match):
    kernel = kwargs.pop("kernel")
    with pytest.raises(err, match=match):
        favor.FeatureMap(kernel, **kwargs)


def test_wrong_input_dim(gen):
    with pytest.raises(ValueError, match="head dim 5 but the feature map was built for dim=8"):
        _fm("positive", gen)(torch.randn(2, 5))
