import pytest
import torch

# The suite is thousands of small ops: one intra-op thread avoids OpenMP spin-waiting, which
# made it ~8x slower on a busy 2-core machine (measured: 115 s vs 14 s for one test file).
torch.set_num_threads(1)


@pytest.fixture
def gen():
    """A fresh, seeded generator: every random draw in a test is reproducible."""
    return torch.Generator().manual_seed(1234)


def randn(gen, *shape, dtype=torch.float64, std=1.0):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).mul(std).to(dtype)
