import pytest
import torch
import torch.nn.functional as F

import favor
from tests.conftest import randn
from tests.ops.test_paths_agree import KERNELS, make_fm, qkv, rel


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel", KERNELS)
def test_padded_batch_equals_unpadded_sequences(gen, device, kernel, causal):
    fm = (make_fm(kernel, rho=None) if (kernel == "oprf" and not causal) else make_fm(kernel)).to(device)
    lengths = [11, 6, 1]
    seqs = [qkv(gen, lead=(3,), lq=n, lk=n) for n in lengths]
    L = max(lengths)

    def pad(t, n):  # junk padding: large values that would show if they leaked in
        return torch.cat([t, randn(gen, *t.shape[:-2], L - n, t.shape[-1]) * 100], -2)

    q = torch.stack([pad(s[0], n) for s, n in zip(seqs, lengths, strict=True)])
    k = torch.stack([pad(s[1], n) for s, n in zip(seqs, lengths, strict=True)])
    v = torch.stack([pad(s[2], n) for s, n in zip(seqs, lengths, strict=True)])
    mask = torch.arange(L)[None, :] >= torch.tensor(lengths)[:, None]
    q, k, v, mask = q.to(device), k.to(device), v.to(device), mask.to(device)
    out = favor.attention(q, k, v, fm, causal=causal, key_padding_mask=mask, chunk_size=4)
    for b, (s, n) in enumerate(zip(seqs, lengths, strict=True)):
        alone = favor.attention(*(t.to(device) for t in s), fm, causal=causal, chunk_size=4)
        assert rel(out[b, :, :n], alone) < 1e-10
    assert rel(out, favor.kernel_attention(q, k, v, fm, causal=causal, key_padding_mask=mask)) < 1e-10


def test_query_with_no_visible_key_returns_zero(gen):
    fm = make_fm("positive")
    q, k, v = qkv(gen, lead=(2,), lq=6, lk=6)
    mask = torch.tensor([[True, True, False, False, False, False], [True] * 6])  # left padding; all padding
    out = favor.attention(q, k, v, fm, causal=True, key_padding_mask=mask)
    assert torch.equal(out[0, :2], torch.zeros(2, 5, dtype=out.dtype))
    assert torch.equal(out[1], torch.zeros(6, 5, dtype=out.dtype))
    assert torch.isfinite(out).all()
    bi = favor.attention(q, k, v, fm, key_padding_mask=mask)
    assert torch.equal(bi[1], torch.zeros(6, 5, dtype=bi.dtype)) and torch.isfinite(bi).all()
    ref = favor.softmax_attention(q, k, v, causal=True, key_padding_mask=mask)
    assert torch.equal(ref[1], torch.zeros(6, 5, dtype=ref.dtype))


def test_per_head_mask_shape(gen):
    fm = make_fm("positive")
    q, k, v = qkv(gen)
    mask = torch.rand(2, 3, 13, generator=gen) < 0.3
    out = favor.attention(q, k, v, fm, key_padding_mask=mask)
    assert rel(out, favor.kernel_attention(q, k, v, fm, key_padding_mask=mask)) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel", KERNELS)
def test_half_precision_inputs(gen, device, kernel, causal, dtype):
    fm = make_fm(kernel).to(device)
    q, k, v = (t.to(device) for t in qkv(gen, dtype=torch.float32, lq=40, lk=40))
    out = favor.attention(q.to(dtype), k.to(dtype), v.to(dtype), fm, causal=causal)
    ref = favor.attention(q.to(dtype).float(), k.to(dtype).float(), v.to(dtype).float(), fm, causal=causal)
    assert out.dtype == dtype and torch.isfinite(out).all()
    # only the final cast rounds: half an ulp of the output's magnitude
    ulp = {torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
    assert rel(out.float(), ref) < ulp


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel", ["positive", "hyperbolic", "oprf", "trig"])
def test_no_overflow_for_logits_up_to_60(gen, device, kernel, causal):
    # q.k.scale reaches +-60 (float32): exp(60) per feature would overflow a naive path
    fm = make_fm(kernel, d=16, m=64).to(device)
    q = randn(gen, 2, 32, 16, dtype=torch.float32)
    q = q / q.norm(dim=-1, keepdim=True) * (60 * 16**0.5) ** 0.5
    k = torch.cat([q[:, :16], -q[:, 16:]], dim=1)
    v = randn(gen, 2, 32, 4, dtype=torch.float32)
    logits = (q @ k.transpose(-1, -2)) / 4
    assert logits.abs().max() > 59
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        out = favor.attention(q.to(device, dt), k.to(device, dt), v.to(device, dt), fm, causal=causal)
        assert torch.isfinite(out).all(), dt


def test_softmax_reference_equals_sdpa(gen):
    q, k, v = qkv(gen, lq=9, lk=9)
    for causal in (False, True):
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        assert rel(favor.softmax_attention(q, k, v, causal=causal), ref) < 1e-12
    mask = torch.rand(2, 9, generator=gen) < 0.3
    mask[:, 0] = False
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=~mask[:, None, None, :])
    assert rel(favor.softmax_attention(q, k, v, key_padding_mask=mask), sdpa) < 1e-12


def test_huge_m_approaches_softmax(gen):
    # small-norm inputs, M = 16384: relative error ~ 1/sqrt(M) scale, far below 0.05
    fm = favor.FeatureMap("positive", dim=8, num_features=16384, generator=gen)
    q, k, v = qkv(gen, lead=(1,), lq=12, lk=12, std=0.5)
    for causal in (False, True):
        out, exact = favor.attention(q, k, v, fm, causal=causal), favor.softmax_attention(q, k, v, causal=causal)
        assert ((out - exact).norm() / exact.norm()).item() < 0.05


def _bad(gen):
    fm = make_fm("positive")
    q, k, v = qkv(gen, dtype=torch.float32)
    return fm, q, k, v


@pytest.mark.parametrize(
    "mutate, err, match",
    [
        (lambda fm, q, k, v: dict(q=q[..., :7]), ValueError, "head dim D"),
        (lambda fm, q, k, v: dict(v=v[..., :5, :]), ValueError, "share the length Lk"),
        (lambda fm, q, k, v: dict(k=k.double()), TypeError, "share a dtype"),
        (lambda fm, q, k, v: dict(q=q.long()), TypeError, "floating-point"),
        (lambda fm, q, k, v: dict(q=q[0, 0, 0]), ValueError, "at least 2 dims"),
        (lambda fm, q, k, v: dict(q=q.numpy()), TypeError, "q must be a torch.Tensor"),
        (lambda fm, q, k, v: dict(q=torch.randn(5, 3, 13, 8)), ValueError, "do not broadcast"),
        (lambda fm, q, k, v: dict(q=q[..., :5, :], causal=True), ValueError, "causal attention needs Lq == Lk"),
        (lambda fm, q, k, v: dict(feature_map="positive"), TypeError, "favor.FeatureMap"),
        (lambda fm, q, k, v: dict(feature_map=make_fm("positive", d=4)), ValueError, "built for dim=4"),
        (
            lambda fm, q, k, v: dict(key_padding_mask=torch.zeros(2, 12, dtype=torch.bool)),
            ValueError,
            r"key_padding_mask must have shape \(B=2, Lk=13\)",
        ),
        (lambda fm, q, k, v: dict(key_padding_mask=torch.zeros(2, 13)), TypeError, "torch.bool"),
        (lambda fm, q, k, v: dict(scale=-1.0), ValueError, "scale must be a positive"),
        (lambda fm, q, k, v: dict(chunk_size=0, causal=True), ValueError, "chunk_size must be a positive int"),
        (lambda fm, q, k, v: dict(return_state=True), ValueError, "causal attention only"),
        (lambda fm, q, k, v: dict(causal=True, initial_state=(1, 2, 3)), TypeError, "favor.State"),
        (
            lambda fm, q, k, v: dict(causal=True, initial_state=favor.State.empty((2, 3), 7, 5)),
            ValueError,
            "initial_state has shapes",
        ),
        (
            lambda fm, q, k, v: dict(
                causal=True, return_state=True, feature_map=make_fm("positive", stabilizer="official")
            ),
            ValueError,
            "cannot be continued",
        ),
    ],
)
def test_bad_input_raises_naming_the_argument(gen, mutate, err, match):
    fm, q, k, v = _bad(gen)
    args = dict(q=q, k=k, v=v, feature_map=fm)
    args.update(mutate(fm, q, k, v))
    with pytest.raises(err, match=match):
        favor.attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("feature_map"), **args)


def test_step_rejects_official_and_mismatched_dims(gen):
    fm, q, k, v = _bad(gen)
    with pytest.raises(ValueError, match="cannot run token by token"):
        favor.step(None, q[..., 0, :], k[..., 0, :], v[..., 0, :], make_fm("positive", stabilizer="official"))
    with pytest.raises(ValueError, match="share the head dim"):
        favor.step(None, q[..., 0, :4], k[..., 0, :], v[..., 0, :], fm)


def test_empty_sequences(gen):
    fm = make_fm("positive")
    q, k, v = qkv(gen, lq=0, lk=0)
    assert favor.attention(q, k, v, fm, causal=True).shape == (2, 3, 0, 5)
    q1 = randn(gen, 2, 3, 4, 8)
    out = favor.attention(q1, k, v, fm)
    assert torch.equal(out, torch.zeros(2, 3, 4, 5, dtype=out.dtype))
