"""Every fast path equals the explicit L x L reference (favor.kernel_attention), outputs and
gradients: float64 to 1e-10, float32 to 1e-5 (the numerics contract)."""

import pytest
import torch

import favor
from tests.conftest import randn

KERNELS = ["positive", "hyperbolic", "trig", "oprf", "relu", "elu"]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def make_fm(kernel, d=8, m=16, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    if kernel == "elu":
        return favor.FeatureMap("elu", dim=d)
    if kernel == "oprf" and "rho" not in kw:
        kw["rho"] = 0.4  # causal FAVOR++ needs a fixed rho to share one A across all paths
    return favor.FeatureMap(kernel, dim=d, num_features=m, generator=g, **kw)


def qkv(gen, lead=(2, 3), lq=13, lk=13, d=8, dv=5, dtype=torch.float64, std=0.6):
    return (
        randn(gen, *lead, lq, d, dtype=dtype, std=std),
        randn(gen, *lead, lk, d, dtype=dtype, std=std),
        randn(gen, *lead, lk, dv, dtype=dtype),
    )


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kernel", KERNELS)
def test_bidirectional_equals_reference(gen, device, kernel, dtype):
    fm = (make_fm(kernel, rho=None) if kernel == "oprf" else make_fm(kernel)).to(device)
    q, k, v = (t.to(device) for t in qkv(gen, lq=11, lk=17, dtype=dtype))  # Lq != Lk, Dv != D
    out = favor.attention(q, k, v, fm)
    assert out.dtype == dtype and out.shape == (2, 3, 11, 5)
    assert rel(out, favor.kernel_attention(q, k, v, fm)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("chunk", [1, 4, 5, 13, 64])
def test_causal_equals_reference(gen, device, kernel, chunk, dtype):
    fm = make_fm(kernel).to(device)
    q, k, v = (t.to(device) for t in qkv(gen, dtype=dtype))  # L=13: chunk 4 and 5 leave a partial last chunk
    out = favor.attention(q, k, v, fm, causal=True, chunk_size=chunk)
    assert rel(out, favor.kernel_attention(q, k, v, fm, causal=True)) < TOL[dtype]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel", KERNELS)
def test_gradients_equal_reference(gen, device, kernel, causal):
    fm = make_fm(kernel).to(device)
    q, k, v = (t.to(device).requires_grad_() for t in qkv(gen))
    w = randn(gen, 2, 3, 13, 5).to(device)
    grads = []
    for fn in (
        lambda: favor.attention(q, k, v, fm, causal=causal, chunk_size=4),
        lambda: favor.kernel_attention(q, k, v, fm, causal=causal),
    ):
        grads.append(torch.autograd.grad((fn() * w).sum(), (q, k, v)))
    for fast, ref in zip(*grads, strict=True):
        assert rel(fast, ref) < 1e-10


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel", ["positive", "trig", "oprf"])
def test_gradcheck(gen, kernel, causal):
    fm = make_fm(kernel, d=4, m=6, rho=None) if (kernel == "oprf" and not causal) else make_fm(kernel, d=4, m=6)
    q, k, v = (t.requires_grad_() for t in qkv(gen, lead=(2,), lq=5, lk=5, d=4, dv=3))
    mask = torch.tensor([[False] * 5, [False, False, False, True, True]])
    assert torch.autograd.gradcheck(
        lambda q, k, v: favor.attention(q, k, v, fm, causal=causal, chunk_size=2, key_padding_mask=mask), (q, k, v)
    )


def test_leading_dims_broadcast(gen):
    fm = make_fm("positive")
    q = randn(gen, 2, 3, 9, 8)
    k = randn(gen, 1, 3, 9, 8)  # shared over the batch
    v = randn(gen, 2, 1, 9, 5)
    for causal in (False, True):
        out = favor.attention(q, k, v, fm, causal=causal)
        assert out.shape == (2, 3, 9, 5)
        assert rel(out, favor.kernel_attention(q, k, v, fm, causal=causal)) < 1e-10


def test_custom_scale(gen):
    fm = make_fm("positive")
    q, k, v = qkv(gen)
    out = favor.attention(q, k, v, fm, scale=0.05)
    # scale enters as sqrt(scale) on q and on k: scale=0.05 equals scale=1 on rescaled inputs
    root = 0.05**0.5
    assert rel(out, favor.attention(q * root, k * root, v, fm, scale=1.0)) < 1e-12
