import pytest
import torch

import favor.hf as fh
from favor.hf.adapter import balancing_map
from favor.hf.fit import fit_adapters
from tests.hf._batches import padded_batch


def _inputs():
    return padded_batch(4, 10, seed=5, pad_row=3, pad_from=6)


def test_save_load_round_trip_is_exact(tiny_bert, tmp_path):
    model = fh.performerize(tiny_bert(), kernel="oprf", plain=True, num_features=48, seed=7, calibration=[_inputs()])
    fh.save_pretrained(model, tmp_path / "m")
    assert not list((tmp_path / "m").glob("*.bin")) and (tmp_path / "m" / "favor.safetensors").is_file()
    loaded = fh.from_pretrained(tmp_path / "m")
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("favor.feature_map.projection") for k in a)
    with torch.no_grad():
        assert torch.equal(model(**_inputs()).last_hidden_state, loaded(**_inputs()).last_hidden_state)


def test_layers_get_different_projections_and_seed_matters(tiny_bert):
    m1 = fh.performerize(tiny_bert(), num_features=16, seed=0)
    m2 = fh.performerize(tiny_bert(), num_features=16, seed=1)
    p1 = [v for k, v in m1.state_dict().items() if k.endswith("projection")]
    p2 = [v for k, v in m2.state_dict().items() if k.endswith("projection")]
    assert len(p1) == 2 and not torch.equal(p1[0], p1[1]) and not torch.equal(p1[0], p2[0])


def test_reparametrisation_leaves_softmax_unchanged():
    g = torch.Generator().manual_seed(0)
    h, d = 3, 8
    q = torch.randn(2, h, 7, d, generator=g, dtype=torch.float64) * 2 + 1
    k = torch.randn(2, h, 7, d, generator=g, dtype=torch.float64) * 3 - 2
    sq = torch.einsum("bhld,bhle->hde", q, q) / 14
    sk = torch.einsum("bhld,bhle->hde", k, k) / 14
    a = balancing_map(sq, sk)
    fm = fh.HeadwiseFeatureMap("oprf", heads=h, dim=d, num_features=4)
    ad = fh.FavorAdapter(fm, heads=h, dim=d).double()
    ad.set_reparametrisation(k.mean((0, 2)), a)
    q2, k2 = ad.transform(q, k)
    torch.testing.assert_close(
        torch.softmax(q2 @ k2.transpose(-1, -2), -1), torch.softmax(q @ k.transpose(-1, -2), -1), rtol=1e-10, atol=1e-12
    )
    # and the balanced norms are no larger than the originals
    before = (q**2).sum(-1).mean() + ((k - k.mean((0, 2), keepdim=True)) ** 2).sum(-1).mean()
    assert (q2**2).sum(-1).mean() + (k2**2).sum(-1).mean() <= before + 1e-9


def test_fit_reduces_layer_error(tiny_bert):
    model = fh.performerize(tiny_bert(), kernel="oprf", plain=True, num_features=8, seed=0, calibration=[_inputs()])
    res = fit_adapters(model, [_inputs()], steps=15, lr=1e-2)
    assert len(res) == 2 and all(after < before for before, after in res), res


def test_unknown_kernel_and_unperformerized_save(tiny_bert, tmp_path):
    with pytest.raises(ValueError, match="kernel"):
        fh.performerize(tiny_bert(), kernel="softmax")
    with pytest.raises(ValueError, match="performerize"):
        fh.save_pretrained(tiny_bert(), tmp_path)


def test_headwise_rho_matches_scalar_rho_per_head():
    import favor

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 9, 8, generator=g, dtype=torch.float64) for _ in range(3))
    hw = fh.HeadwiseFeatureMap("oprf", heads=3, dim=8, num_features=32, generator=torch.Generator().manual_seed(0))
    rho = torch.tensor([0.1, 0.5, 2.0], dtype=torch.float64)
    hw.set_head_rho(rho)
    out = favor.attention(q, k, v, hw)
    for h in range(3):
        plain = favor.FeatureMap("oprf", projection=hw.projection, rho=float(rho[h]))
        ref = favor.attention(q[:, h], k[:, h], v[:, h], plain)
        # same projection, same A* for this head: an exact identity up to float64 round-off
        torch.testing.assert_close(out[:, h], ref, rtol=1e-10, atol=1e-12)
