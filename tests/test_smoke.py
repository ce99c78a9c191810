import torch

import favor


def test_import_and_call():
    fm = favor.FeatureMap("positive", dim=8, num_features=16, generator=torch.Generator().manual_seed(0))
    q = torch.randn(2, 3, 10, 8)
    out = favor.attention(q, q, q, fm, causal=True)
    assert out.shape == (2, 3, 10, 8)
    assert torch.isfinite(out).all()
