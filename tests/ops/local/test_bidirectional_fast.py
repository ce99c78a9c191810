"""favor.ops.local.bidirectional_fast, the bidirectional exact-local-terms path with a hand-written backward,
against its references: local.local_exact_attention (the autograd path) and the explicit
quadratic local_exact_reference, outputs and gradients (q, k, the logit inputs, v, a per-head
log_const) in float64; the banded helpers against dense loops."""

import pytest
import torch

from favor.features.feature_map import FeatureMap
from favor.ops.chunking import Scratch
from favor.ops.local import bidirectional_fast as local_fast_module
from favor.ops.local.bidirectional_fast import (
    band_products,
    band_transpose,
    band_weighted_sum,
    fast_eligible,
    local_fast,
)
from favor.ops.local.window import local_exact_attention, local_exact_reference, pair_features


@pytest.mark.parametrize("w,block,length", [(0, 4, 9), (2, 4, 9), (3, 2, 11), (5, 32, 7), (1, 3, 3)])
def test_band_helpers_equal_dense_loops(w, block, length):
    g = torch.Generator().manual_seed(w + block)
    n, x = 3, 5
    a, b = (torch.randn(n, length, x, generator=g, dtype=torch.float64) for _ in range(2))
    coeff = torch.randn(n, length, 2 * w + 1, generator=g, dtype=torch.float64)
    inside = torch.zeros(length, 2 * w + 1, dtype=torch.bool)
    for i in range(length):
        for s in range(2 * w + 1):
            inside[i, s] = 0 <= i + s - w < length
    coeff = coeff * inside  # the callers' contract: 0 beyond the ends
    prod = torch.zeros(n, length, 2 * w + 1, dtype=torch.float64)
    wsum = torch.zeros(n, length, x, dtype=torch.float64)
    tsum = torch.zeros(n, length, x, dtype=torch.float64)  # sum over queries i that see key j
    for i in range(length):
        for s in range(2 * w + 1):
            j = i + s - w
            if 0 <= j < length:
                prod[:, i, s] = (a[:, i] * b[:, j]).sum(-1)
                wsum[:, i] += coeff[:, i, s, None] * b[:, j]
                tsum[:, j] += coeff[:, i, s, None] * a[:, i]
    got = band_products(a, b, w, block)
    torch.testing.assert_close(got * inside, prod, rtol=0, atol=1e-12)
    torch.testing.assert_close(band_weighted_sum(coeff, b, w, block), wsum, rtol=0, atol=1e-12)
    torch.testing.assert_close(band_weighted_sum(band_transpose(coeff, w), a, w, block), tsum, rtol=0, atol=1e-12)
    # reused buffers (the forward's): the same numbers on the second use, whose buffers hold
    # the first use's rows, as on the first
    scratch = Scratch()
    for _ in range(2):
        got = band_products(a, b, w, block, scratch=scratch)
        torch.testing.assert_close(got * inside, prod, rtol=0, atol=1e-12)
        torch.testing.assert_close(band_weighted_sum(coeff, b, w, block, scratch=scratch), wsum, rtol=0, atol=1e-12)
        a, b = a.flip(0), b.flip(0)
        prod, wsum = prod.flip(0), wsum.flip(0)
        coeff = coeff.flip(0)


def _case(kernel: str, length: int, dense: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    b, h, d, m = 2, 3, 4, 16
    q = (torch.randn(b, h, length, d, generator=g, dtype=torch.float64) * 0.7).requires_grad_(True)
    k = (torch.randn(b, h, length, d, generator=g, dtype=torch.float64) * 0.7 + 0.3).requires_grad_(True)
    v = torch.randn(b, h, length, 5, generator=g, dtype=torch.float64, requires_grad=True)
    # logit inputs other than the feature inputs (as favor.hf's dense features have), or the same
    qx = torch.randn(b, h, length, 3, generator=g, dtype=torch.float64, requires_grad=True) if dense else None
    kx = torch.randn(b, h, length, 3, generator=g, dtype=torch.float64, requires_grad=True) if dense else None
    fm = FeatureMap(kernel, dim=d, num_features=m, generator=g).double()
    if kernel == "oprf":
        fm.rho.fill_(0.4)  # a fixed A (calibrated FAVOR++): a constant of the data
    pad = torch.zeros(b, length, dtype=torch.bool)
    pad[1, length // 2 :] = True
    log_const = torch.tensor([0.0, -0.3, 0.5], dtype=torch.float64)[:, None, None].requires_grad_(True)
    return q, k, v, qx, kx, fm, pad, log_const, g


def _assert_same_gradients(fast, slow, keep, g, kernel, dense, tensors):
    """d(fast . w) = d(slow . w) for a random w on the kept rows, for every input that takes a
    gradient: q, k, v, log_const, FAVOR+'s projection, and the dense features' qx, kx."""
    q, k, v, log_const, projection, qx, kx = tensors
    names = (
        ["q", "k", "v", "log_const"]
        + (["projection"] if kernel == "positive" else [])
        + (["qx", "kx"] if dense else [])
    )
    leaves = [q, k, v, log_const] + [{"projection": projection, "qx": qx, "kx": kx}[n] for n in names[4:]]
    w = torch.randn(fast.shape, generator=g, dtype=torch.float64) * keep
    got = torch.autograd.grad((fast * w).sum(), leaves, retain_graph=True)
    want = torch.autograd.grad((slow * w).sum(), leaves)
    # float64, the same sums in other orders: round-off only
    for name, x, y in zip(names, got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-11, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("kernel", ["positive", "oprf"])
@pytest.mark.parametrize(
    "window,sinks,length,block,dense,padded",
    [
        (0, 0, 9, 4, False, True),
        (0, 2, 9, 4, False, True),  # a sink after the first query's window: exact as a sink
        (1, 1, 9, 4, True, True),
        (2, 0, 13, 4, False, False),
        (-1, 2, 9, 4, True, True),
        (3, 2, 70, 32, True, True),  # several blocks, a ragged last one
        (8, 1, 40, 32, False, False),  # the CLI's default window, W > L / blocks
        (12, 1, 12, 4, False, True),  # the window covers the sequence
        (8, 1, 64, 16, True, True),  # blocks tile L: features written straight into the key layout
    ],
)
@pytest.mark.parametrize("group_rows", [4096, 128])  # 128: three groups of two sequences (L=64)
def test_fast_path_equals_autograd_path_and_reference(
    kernel, window, sinks, length, block, dense, padded, group_rows, monkeypatch
):
    monkeypatch.setattr(local_fast_module, "GROUP_ROWS", group_rows)
    q, k, v, qx, kx, fm, pad, log_const, g = _case(kernel, length, dense, window + 3 * sinks + length)
    pad = pad if padded else None
    root = 0.9
    a = fm.oprf_a(q * root, k * root) if kernel == "oprf" else None
    if kernel == "positive":  # fitted and distilled: FAVOR+'s projection is trained too
        fm.projection = fm.projection.clone().requires_grad_(True)
    qx_, kx_ = (qx, kx) if dense else (q * root, k * root)
    opts = dict(window=window, sinks=sinks, log_const=log_const, key_padding_mask=pad)
    fast = local_fast(fm, q, k, qx_, kx_, v, root=root, a=a, block=block, **opts)
    fq, fk = pair_features(fm, q, k, root, None if pad is None else pad[:, None, :])
    slow = local_exact_attention(fq, fk, qx_, kx_, v, **opts)
    kernel_est = fq.explicit() @ fk.explicit().transpose(-1, -2)
    ref = local_exact_reference(kernel_est, qx_ @ kx_.transpose(-1, -2), v, **opts)
    keep = torch.ones_like(fast[..., :1]) if pad is None else ~pad[:, None, :, None]
    # float64, the same sums in other orders: round-off only
    torch.testing.assert_close(fast * keep, slow * keep, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fast * keep, ref * keep, rtol=1e-10, atol=1e-12)
    _assert_same_gradients(fast, slow, keep, g, kernel, dense, (q, k, v, log_const, fm.projection, qx, kx))


def test_float32_agrees_with_float64():
    q, k, v, _, _, fm, pad, log_const, _ = _case("positive", 50, False, 0)
    root = 0.9
    outs = []
    for dt in (torch.float64, torch.float32):
        fmd = FeatureMap("positive", dim=4, num_features=16, generator=torch.Generator().manual_seed(0)).to(dt)
        qd, kd, vd = (x.detach().to(dt) for x in (q, k, v))
        outs.append(
            local_fast(fmd, qd, kd, qd * root, kd * root, vd, root=root, window=8, sinks=1, key_padding_mask=pad)
        )
    # float32 round-off on O(1) outputs
    torch.testing.assert_close(outs[1].double(), outs[0], rtol=1e-5, atol=1e-5)


def test_refuses_what_it_cannot_do():
    q, k, v, _, _, fm, _, _, _ = _case("positive", 6, False, 0)
    with pytest.raises(ValueError, match="window >= 0 or sinks > 0"):
        local_fast(fm, q, k, q, k, v, root=1.0, window=-1, sinks=0)
    with pytest.raises(ValueError, match="as many queries as keys"):
        local_fast(fm, q, k[..., :4, :], q, k[..., :4, :], v[..., :4, :], root=1.0, window=1, sinks=0)
    trig = FeatureMap("trig", dim=4, num_features=8, generator=torch.Generator().manual_seed(0)).double()
    with pytest.raises(ValueError, match="local_fast takes FAVOR"):
        local_fast(trig, q, k, q, k, v, root=1.0, window=1, sinks=0)
    oprf = FeatureMap("oprf", dim=4, num_features=8, generator=torch.Generator().manual_seed(0)).double()
    a = oprf.oprf_a(q, k)  # rho from the data: A carries q's and k's gradient
    assert a.requires_grad and not fast_eligible(oprf, a)


def test_the_benchmark_checks_before_timing(tmp_path, monkeypatch):
    # benchmarks/local_terms.py times local_fast only after comparing it with the autograd
    # path (float64, outputs and gradients); a tiny run exercises that check end to end
    from benchmarks import local_terms

    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    try:
        assert (
            local_terms.main(["--lengths", "64", "--repeats", "1", "--backward", "--autograd", "--threads", "1"]) == 0
        )
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "runs" / "bench" / "local_terms_block32_fwd_bwd.json").exists()
    assert local_terms.main(["--lengths", "40", "--repeats", "1", "--block", "1", "--threads", "1"]) == 0
    assert (tmp_path / "runs" / "bench" / "local_terms_fwd.json").exists()


@pytest.mark.parametrize("kernel", ["positive", "oprf"])
@pytest.mark.parametrize(
    "window,sinks,length,blocks,dense,padded",
    [
        (1, 1, 9, 4, True, True),
        (0, 0, 13, 4, False, False),
        (-1, 2, 9, 3, True, True),  # blocks alone, no widening
        (3, 2, 70, 16, True, True),  # a ragged last block
        (8, 1, 64, 16, False, True),  # blocks tile L: features straight into the key layout
        (8, 1, 40, 64, True, False),  # one block wider than the sequence
        (5, 1, 24, 4, False, True),  # W > C: the extents overlap several blocks
    ],
)
@pytest.mark.parametrize("group_rows", [4096, 128])
def test_exact_blocks_fast_path_equals_local_block(
    kernel, window, sinks, length, blocks, dense, padded, group_rows, monkeypatch
):
    from favor.ops.local.block import block_exact_attention, block_exact_reference

    monkeypatch.setattr(local_fast_module, "GROUP_ROWS", group_rows)
    q, k, v, qx, kx, fm, pad, log_const, g = _case(kernel, length, dense, window + 3 * sinks + length + blocks)
    pad = pad if padded else None
    root = 0.9
    a = fm.oprf_a(q * root, k * root) if kernel == "oprf" else None
    if kernel == "positive":
        fm.projection = fm.projection.clone().requires_grad_(True)
    qx_, kx_ = (qx, kx) if dense else (q * root, k * root)
    opts = dict(window=window, sinks=sinks, log_const=log_const, key_padding_mask=pad)
    fast = local_fast(fm, q, k, qx_, kx_, v, root=root, a=a, exact_block=blocks, **opts)
    fq, fk = pair_features(fm, q, k, root, None if pad is None else pad[:, None, :])
    slow = block_exact_attention(fq, fk, qx_, kx_, v, block=blocks, **opts)
    kernel_est = fq.explicit() @ fk.explicit().transpose(-1, -2)
    ref = block_exact_reference(kernel_est, qx_ @ kx_.transpose(-1, -2), v, block=blocks, **opts)
    keep = torch.ones_like(fast[..., :1]) if pad is None else ~pad[:, None, :, None]
    # float64, the same sums in other orders: round-off only
    torch.testing.assert_close(fast * keep, slow * keep, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fast * keep, ref * keep, rtol=1e-10, atol=1e-12)
    _assert_same_gradients(fast, slow, keep, g, kernel, dense, (q, k, v, log_const, fm.projection, qx, kx))
