import pytest
import torch


@pytest.fixture
def gen():
    """A fresh, seeded generator: every random draw in a test is reproducible."""
    return torch.Generator().manual_seed(1234)


def randn(gen, *shape, dtype=torch.float64, std=1.0):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).mul(std).to(dtype)
