"""Per-sequence key shift (key_shift="sequence"): the pair mean of each sequence, exact for
softmax, independent of padding, calibrated on centred keys, left out of causal layers."""

import pytest
import torch

import favor.hf as fh
from favor.hf.adapter import sequence_pair_mean
from favor.hf.fit import record_attention
from tests.hf._batches import padded_batch


def _inputs():
    return padded_batch(3, 12, seed=2, pad_row=1, pad_from=7)


def test_sequence_pair_mean_matches_a_loop_over_real_tokens():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 2, 6, 4, generator=g, dtype=torch.float64)
    k = torch.randn(3, 2, 6, 4, generator=g, dtype=torch.float64)
    keep = torch.ones(3, 6, dtype=torch.bool)
    keep[1, 4:] = False
    keep[2, 1:] = False
    got = sequence_pair_mean(q, k, keep)
    for b in range(3):
        n = int(keep[b].sum())
        ref = q[b, :, :n].mean(-2) + k[b, :, :n].mean(-2)  # real tokens are a prefix here
        torch.testing.assert_close(got[b, :, 0], ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sequence_pair_mean(q, k), q.mean(-2, keepdim=True) + k.mean(-2, keepdim=True))
    with pytest.raises(ValueError, match="keep must be"):
        sequence_pair_mean(q, k, keep[:, :5])


def _model(tiny_bert, m=16, **kw):
    return fh.performerize(
        tiny_bert(), kernel="derf", plain=True, num_features=m, key_shift="sequence", calibration=[_inputs()], **kw
    )


def test_sequence_shift_keeps_softmax_weights_and_ignores_padding(tiny_bert):
    model = _model(tiny_bert)
    inputs = _inputs()
    keep = inputs["attention_mask"].bool()
    module = next(iter(record_attention(model, [inputs])))
    adapter = module.favor
    assert adapter.sequence_shift
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, adapter.heads, 12, adapter.dim, generator=g, dtype=torch.float64)
    k = torch.randn(3, adapter.heads, 12, adapter.dim, generator=g, dtype=torch.float64)
    qa, kb = adapter.transform(q, k, keep=keep)
    block = torch.where(keep, 0.0, float("-inf"))[:, None, None, :]
    ref = torch.softmax(q @ k.transpose(-1, -2) + block, -1)
    got = torch.softmax(qa @ kb.transpose(-1, -2) + block, -1)
    # a per-query constant on the logits: the same weights up to the float32 storage of the maps
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    # padded positions do not enter the shift: changing them leaves real keys' features unchanged
    q2, k2 = q.clone(), k.clone()
    q2[1, :, 7:] += 100.0
    k2[1, :, 7:] -= 100.0
    qa2, kb2 = adapter.transform(q2, k2, keep=keep)
    torch.testing.assert_close(kb2[1, :, :7], kb[1, :, :7], rtol=0, atol=0)
    torch.testing.assert_close(qa2[1, :, :7], qa[1, :, :7], rtol=0, atol=0)


def test_sequence_shift_error_falls_with_m_and_round_trips(tiny_bert, tmp_path):
    inputs = _inputs()
    keep = inputs["attention_mask"].bool()
    with torch.no_grad():
        ref = tiny_bert()(**inputs).last_hidden_state[keep]
        errs = []
        for m in (16, 8192):
            out = _model(tiny_bert, m)(**inputs).last_hidden_state[keep]
            errs.append(float((out - ref).norm() / ref.norm()))
    # unbiased features after an exact reparametrisation: Monte Carlo error ~ M^-1/2 (fixed seed)
    assert errs[1] < errs[0] / 4 and errs[1] < 0.05, errs
    model = _model(tiny_bert, 24)
    fh.save_pretrained(model, tmp_path / "m")
    loaded = fh.from_pretrained(tmp_path / "m")
    assert all(
        m.favor.sequence_shift for m in loaded.modules() if isinstance(getattr(m, "favor", None), torch.nn.Module)
    )
    with torch.no_grad():
        assert torch.equal(model(**inputs).last_hidden_state, loaded(**inputs).last_hidden_state)


def test_sequence_calibration_sees_centred_keys(tiny_bert):
    from favor.hf.performerize import attention_modules

    inputs = _inputs()
    keep = inputs["attention_mask"].bool()
    plain = attention_modules(tiny_bert(), [inputs])
    centred = attention_modules(tiny_bert(), [inputs], sequence_shift=True)
    calls = record_attention(tiny_bert(), [inputs])
    for (_, _, sp), (_, _, sc), recorded in zip(plain, centred, calls.values(), strict=True):
        q, k = recorded[0][0].double(), recorded[0][1].double()
        kc = k - sequence_pair_mean(q, k, keep)
        w = keep[:, None, :, None].double()
        torch.testing.assert_close(sc.sum_k, (kc * w).sum((0, 2)), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(sc.sum_q, sp.sum_q, rtol=0, atol=0)  # queries are not shifted


def test_causal_layers_keep_the_constant_shift(tiny_llama):
    # a sequence mean would leak future tokens: causal layers calibrate and run as key_shift="pair"
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (2, 9), generator=g)
    cal = [{"input_ids": ids}]
    seq = fh.performerize(tiny_llama(), num_features=8, key_shift="sequence", calibration=cal)
    pair = fh.performerize(tiny_llama(), num_features=8, key_shift="pair", calibration=cal)
    assert all(m.favor.sequence_shift for m in seq.modules() if isinstance(getattr(m, "favor", None), torch.nn.Module))
    with torch.no_grad():
        a, b = seq(input_ids=ids).logits, pair(input_ids=ids).logits
        assert torch.equal(a, b)
        # and the prefix's outputs do not depend on later tokens
        c = seq(input_ids=ids[:, :5]).logits
    torch.testing.assert_close(c, a[:, :5], rtol=1e-10, atol=1e-10)
