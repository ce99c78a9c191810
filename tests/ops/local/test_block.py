"""Exact blocks (favor.ops.local.block): the linear path equals the explicit quadratic one
(outputs and gradients, ragged last blocks, padding, sinks), block 1 is local.py's window, a
block covering the sequence is softmax attention, and the exact set is what the docstring says.
The model path against this reference: tests/hf/test_local.py; local_fast's blocks:
tests/hf/test_local_fast.py."""

import pytest
import torch

from favor.features.feature_map import FeatureMap
from favor.ops.local.block import block_exact_attention, block_exact_positions, block_exact_reference, check_block
from favor.ops.local.window import local_exact_attention


def test_exact_set_is_the_widened_block_and_the_sinks():
    near = block_exact_positions(7, 1, 1, 3)
    picked = [[j for j in range(7) if near[i, j]] for i in range(7)]
    # blocks {0,1,2} {3,4,5} {6}, widened by one key either side, plus key 0
    assert picked[0] == [0, 1, 2, 3] and picked[4] == [0, 2, 3, 4, 5, 6] and picked[6] == [0, 5, 6]
    assert block_exact_positions(5, 2, 0, 1).equal((torch.arange(5)[:, None] - torch.arange(5)).abs() <= 2)
    assert not block_exact_positions(4, -1, 0, 1).any()


def _inputs(length, seed, m=32):
    g = torch.Generator().manual_seed(seed)
    b, h, d = 2, 3, 4
    q = (torch.randn(b, h, length, d, generator=g, dtype=torch.float64) * 0.7).requires_grad_(True)
    k = (torch.randn(b, h, length, d, generator=g, dtype=torch.float64) * 0.7 + 0.3).requires_grad_(True)
    v = torch.randn(b, h, length, 5, generator=g, dtype=torch.float64, requires_grad=True)
    pad = torch.zeros(b, length, dtype=torch.bool)
    pad[1, 6:] = True
    pad[0, length - 2 :] = True
    fm = FeatureMap("positive", dim=d, num_features=m, generator=g).double()
    log_const = torch.tensor([0.0, -0.3, 0.5], dtype=torch.float64)[:, None, None]
    return g, q, k, v, pad, fm, log_const


@pytest.mark.parametrize(
    "window,sinks,block,length",
    [(0, 0, 4, 9), (1, 1, 4, 9), (-1, 2, 3, 9), (2, 1, 16, 9), (8, 1, 64, 150), (3, 0, 5, 23), (2, 2, 1, 11)],
)
def test_linear_path_equals_explicit_reference_with_gradients(window, sinks, block, length):
    g, q, k, v, pad, fm, log_const = _inputs(length, window + 7 * sinks + block)
    fq, fk = fm.pair(q, k)
    out = block_exact_attention(
        fq, fk, q, k, v, window=window, sinks=sinks, block=block, log_const=log_const, key_padding_mask=pad
    )
    fq, fk = fm.pair(q, k)
    kernel = fq.explicit() @ fk.explicit().transpose(-1, -2)
    ref = block_exact_reference(
        kernel,
        q @ k.transpose(-1, -2),
        v,
        window=window,
        sinks=sinks,
        block=block,
        log_const=log_const,
        key_padding_mask=pad,
    )
    keep = ~pad[:, None, :, None].expand_as(out[..., :1])
    # the same sums computed two ways, in float64: round-off only
    torch.testing.assert_close(out * keep, ref * keep, rtol=1e-10, atol=1e-12)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64) * keep
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("window,sinks", [(0, 0), (3, 1), (-1, 2)])
def test_block_one_is_the_window_of_local_py(window, sinks):
    _, q, k, v, pad, fm, log_const = _inputs(37, 3)
    fq, fk = fm.pair(q, k)
    kw = dict(window=window, sinks=sinks, log_const=log_const, key_padding_mask=pad)
    torch.testing.assert_close(
        block_exact_attention(fq, fk, q, k, v, block=1, **kw),
        local_exact_attention(fq, fk, q, k, v, **kw),
        rtol=1e-10,
        atol=1e-12,
    )


def test_block_over_the_sequence_is_softmax_attention():
    _, q, k, v, pad, fm, _ = _inputs(20, 5, m=4)  # few features: a FAVOR term would show
    fq, fk = fm.pair(q, k)
    out = block_exact_attention(fq, fk, q, k, v, window=0, sinks=0, block=32, key_padding_mask=pad)
    s = (q @ k.transpose(-1, -2)).masked_fill(pad[:, None, None, :], float("-inf"))
    keep = ~pad[:, None, :, None]
    torch.testing.assert_close(out * keep, (s.softmax(-1) @ v) * keep, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bad", [0, -3, 2.0, True, None])
def test_block_is_checked(bad):
    with pytest.raises(ValueError, match="exact_block must be an int >= 1"):
        check_block(bad)


def _model_inputs():
    from tests.hf._batches import padded_batch

    return padded_batch(3, 12, seed=2, pad_row=1, pad_from=7)


def test_whole_sequence_block_is_softmax_and_save_load_keeps_the_block(tiny_bert, tmp_path):
    import favor.hf as fh

    inputs = _model_inputs()
    ref = tiny_bert()
    with torch.no_grad():
        want = ref(**inputs).last_hidden_state
    model = fh.performerize(
        tiny_bert(), kernel="derf", plain=True, num_features=8, calibration=[inputs], exact_block=16
    )
    keep = inputs["attention_mask"].bool()
    with torch.no_grad():
        got = model(**inputs).last_hidden_state
    # every key exact at M=8: the softmax model's output up to the float32 reparametrisation
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-4, atol=1e-4)
    small = fh.performerize(tiny_bert(), kernel="derf", plain=True, num_features=8, calibration=[inputs], exact_block=4)
    fh.save_pretrained(small, tmp_path / "m")
    loaded = fh.from_pretrained(tmp_path / "m")
    assert {m.exact_block for m in loaded.modules() if hasattr(m, "exact_block")} == {4}
    with torch.no_grad():
        a, b = small(**inputs).last_hidden_state, loaded(**inputs).last_hidden_state
    assert torch.equal(a, b) and float((a - want)[keep].abs().max()) > 1e-3  # FAVOR estimates the rest


def test_a_causal_layer_runs_blocks_causally_and_decodes_them_with_a_cache(tiny_llama):
    import favor.hf as fh

    model = fh.performerize(tiny_llama(), num_features=8, exact_window=2, exact_block=4).double()
    ids = torch.randint(1, 50, (1, 13), generator=torch.Generator().manual_seed(0))
    later = ids.clone()
    later[:, 9:] = 7
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, model(input_ids=later).logits
    # the core causal path (favor.ops.local.causal_fast): block 8..11 never shows key
    # 11 to query 9, so logits before position 9 are bit-for-bit unchanged
    assert torch.equal(a[:, :9], b[:, :9])
    assert not torch.equal(a[:, 9:], b[:, 9:])
    # a FavorCache keeps an ExactState (a ring of C + W keys): prompt of 6, then one token at a time
    cache, pieces = fh.FavorCache(model), []
    with torch.no_grad():
        for lo, hi in [(0, 6)] + [(i, i + 1) for i in range(6, 13)]:
            pieces.append(model(input_ids=ids[:, lo:hi], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(pieces, 1), a, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="exact_block must be an int >= 1"):
        fh.performerize(tiny_llama(), exact_block=0)
