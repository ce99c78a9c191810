"""Exact local terms (favor.ops.local): the linear-time path equals the explicit quadratic one
(outputs and gradients, bidirectional and causal), a window covering the sequence gives
softmax attention exactly for every kernel, causal outputs never see later tokens, cached
decoding equals teacher forcing, and the option is checked, saved and loaded."""

import json
import math

import pytest
import torch

import favor.hf as fh
from favor.features.feature_map import FeatureMap
from favor.hf.fit import record_attention
from favor.hf.interface import favor_attention_forward
from favor.ops.local.block import block_exact_reference
from favor.ops.local.window import exact_positions, local_exact_attention, local_exact_reference
from tests.hf._batches import decoded_logits, padded_batch


def _inputs():
    return padded_batch(3, 12, seed=2, pad_row=1, pad_from=7)


def test_exact_positions_lists_neighbours_then_new_sinks():
    index, ok = exact_positions(5, 1, 2)
    picked = [sorted(int(j) for j, o in zip(index[i], ok[i], strict=True) if o) for i in range(5)]
    assert picked == [[0, 1], [0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 3, 4], [0, 1, 3, 4]]
    index, ok = exact_positions(4, -1, 1)  # sinks only
    assert index.shape == (4, 1) and bool(ok.all()) and int(index.max()) == 0
    with pytest.raises(ValueError, match="window >= 0 or sinks > 0"):
        exact_positions(4, -1, 0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "window,sinks,length", [(0, 0, 9), (1, 1, 9), (2, 0, 9), (-1, 2, 9), (3, 2, 9), (3, 1, 150), (5, 0, 128)]
)
def test_linear_path_equals_explicit_reference_with_gradients(window, sinks, length, causal):
    # 150 and 128 positions: several blocks of the banded products, a ragged last one
    g = torch.Generator().manual_seed(window + 7 * sinks)
    b, h, d, m = 2, 3, 4, 32
    q = (torch.randn(b, h, length, d, generator=g, dtype=torch.float64) * 0.7).requires_grad_(True)
    k = (torch.randn(b, h, length, d, generator=g, dtype=torch.float64) * 0.7 + 0.3).requires_grad_(True)
    v = torch.randn(b, h, length, 5, generator=g, dtype=torch.float64, requires_grad=True)
    pad = torch.zeros(b, length, dtype=torch.bool)
    pad[1, 6:] = True
    pad[0, length - 2 :] = True
    fm = FeatureMap("positive", dim=d, num_features=m, generator=g).double()
    log_const = torch.tensor([0.0, -0.3, 0.5], dtype=torch.float64)[:, None, None]

    def run(linear: bool):
        fq, fk = fm.pair(q, k)
        if linear:
            return local_exact_attention(
                fq, fk, q, k, v, window=window, sinks=sinks, log_const=log_const, key_padding_mask=pad, causal=causal
            )
        kernel = fq.explicit() @ fk.explicit().transpose(-1, -2)
        logits = q @ k.transpose(-1, -2)
        return local_exact_reference(
            kernel,
            logits,
            v,
            window=window,
            sinks=sinks,
            log_const=log_const,
            key_padding_mask=pad,
            causal=causal,
        )

    keep = ~pad[:, None, :, None].expand(b, h, length, 1)
    out, ref = run(True), run(False)
    # the same sums computed two ways, in float64: round-off only
    torch.testing.assert_close(out * keep, ref * keep, rtol=1e-10, atol=1e-12)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64) * keep
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-11)


def _softmax_attention(q, k, v, keep, scaling):
    s = (q.double() @ k.double().transpose(-1, -2)) * scaling
    s = s.masked_fill(~keep[:, None, None, :], -math.inf)
    return (s.softmax(-1) @ v.double()).transpose(1, 2)


@pytest.mark.parametrize("kernel", ["positive", "oprf", "derf"])
@pytest.mark.parametrize("key_shift", ["pair", "sequence"])
def test_window_over_the_whole_sequence_is_softmax_attention(tiny_bert, kernel, key_shift):
    # every key is exact: any error in the key shift, the reparametrisation or the dense
    # features' log_const shows here, at M=8 where FAVOR alone is far off
    inputs = _inputs()
    model = fh.performerize(
        tiny_bert(), kernel=kernel, num_features=8, calibration=[inputs], key_shift=key_shift, exact_window=12
    )
    keep = inputs["attention_mask"].bool()
    for module, recorded in record_attention(model, [inputs]).items():
        q, k, v, mask, scaling, _, _, _ = recorded[0]
        q, k, v = q.double(), k.double(), v.double()
        got, _ = favor_attention_forward(module, q, k, v, mask, scaling=scaling)
        ref = _softmax_attention(q, k, v, keep, scaling)
        # A and A^-T are stored in float32, so the logits carry float32 round-off (~1e-7)
        torch.testing.assert_close(got[keep], ref[keep], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("block", [1, 5])  # 5: exact blocks (local_block.py), 1: the window
@pytest.mark.parametrize("kernel", ["positive", "oprf", "derf"])
def test_model_path_equals_the_explicit_reference(tiny_bert, kernel, block):
    # favor_attention_forward (fast row features, FAVOR++'s per-head A, the dense constant)
    # against the quadratic reference built from the map's own explicit kernel estimate
    inputs = _inputs()
    pad = ~inputs["attention_mask"].bool()
    keep = ~pad
    model = fh.performerize(
        tiny_bert(),
        kernel=kernel,
        num_features=16,
        calibration=[inputs],
        exact_window=1,
        exact_sinks=1,
        exact_block=block,
    )
    for module, recorded in record_attention(model, [inputs]).items():
        q, k, v, mask, scaling, _, _, _ = recorded[0]
        q, k, v = q.double(), k.double(), v.double()
        got, _ = favor_attention_forward(module, q, k, v, mask, scaling=scaling)
        adapter = module.favor
        qf, kf, scale = adapter.inputs(q, k, scaling, keep=keep)
        root = (q.shape[-1] ** -0.5 if scale is None else scale) ** 0.5
        kernel_est = adapter.feature_map.double().estimate_kernel(qf * root, kf * root)
        qx, kx = adapter.logit_inputs(q, k, scaling, keep=keep)
        opts = dict(window=1, sinks=1, log_const=adapter.log_const(torch.float64), key_padding_mask=pad)
        logits = qx @ kx.transpose(-1, -2)
        if block == 1:
            ref = local_exact_reference(kernel_est, logits, v, **opts)
        else:
            ref = block_exact_reference(kernel_est, logits, v, block=block, **opts)
        ref = ref.transpose(1, 2)
        # float64 throughout: round-off only (two orders of summation, stabilised vs explicit)
        torch.testing.assert_close(got[keep], ref[keep], rtol=1e-9, atol=1e-9)


def test_local_terms_cut_the_error_of_a_small_feature_count(tiny_bert):
    # fixed seeds; at M=8 FAVOR alone errs by ~14 % on this random model (no locality, so the
    # gain is modest: 0.139 -> 0.116); a wrong log_const or sign makes it worse, not better
    inputs = _inputs()
    keep = inputs["attention_mask"].bool()
    errors = {}
    for window in (-1, 2):
        model = fh.performerize(
            tiny_bert(), kernel="derf", plain=True, num_features=8, calibration=[inputs], exact_window=window
        )
        num = den = 0.0
        for module, recorded in record_attention(model, [inputs]).items():
            q, k, v, mask, scaling, _, _, _ = recorded[0]
            got, _ = favor_attention_forward(module, q.double(), k.double(), v.double(), mask, scaling=scaling)
            ref = _softmax_attention(q, k, v, keep, scaling)
            num += float(((got - ref)[keep] ** 2).sum())
            den += float((ref[keep] ** 2).sum())
        errors[window] = (num / den) ** 0.5
    assert errors[-1] > 0.1 and errors[2] < 0.9 * errors[-1], errors


def test_options_are_checked(tiny_bert):
    with pytest.raises(ValueError, match="exact_window must be an int >= -1"):
        fh.performerize(tiny_bert(), exact_window=-2)
    with pytest.raises(ValueError, match="exact_sinks must be an int >= 0"):
        fh.performerize(tiny_bert(), exact_sinks=True)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_causal_whole_window_is_softmax_and_later_tokens_change_nothing(tiny_llama):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 64, (2, 10), generator=g)
    ref = _logits(tiny_llama(), ids)
    exact = fh.performerize(tiny_llama(), num_features=8, seed=0, exact_window=10)
    # every visible key exact: the softmax decoder's logits, at M=8 (float64 model,
    # uncalibrated adapters: round-off only)
    torch.testing.assert_close(_logits(exact, ids), ref, rtol=1e-9, atol=1e-9)
    model = fh.performerize(tiny_llama(), num_features=8, seed=0, exact_window=2, exact_sinks=1)
    out = _logits(model, ids)
    assert float((out - ref).abs().max()) > 1e-6  # FAVOR does estimate the far keys
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 7) % 63 + 1
    out2 = _logits(model, changed)
    assert torch.equal(out[:, :6], out2[:, :6])  # bit for bit: no later token reaches position < 6
    assert not torch.equal(out[:, 6:], out2[:, 6:])


def test_causal_cached_decoding_equals_teacher_forcing(tiny_llama):
    model = fh.performerize(tiny_llama(), num_features=16, seed=2, exact_window=2, exact_sinks=1)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1, 64, (1, 8), generator=g)
    full = _logits(model, ids)
    torch.testing.assert_close(decoded_logits(model, ids, 5), full, rtol=1e-10, atol=1e-10)


def test_save_load_keeps_the_window_and_reads_older_saves(tiny_bert, tmp_path):
    inputs = _inputs()
    model = fh.performerize(
        tiny_bert(), kernel="oprf", plain=True, num_features=16, calibration=[inputs], exact_window=1, exact_sinks=1
    )
    fh.save_pretrained(model, tmp_path / "m")
    loaded = fh.from_pretrained(tmp_path / "m")
    assert all(a.exact_window == 1 and a.exact_sinks == 1 for a in _adapters(loaded))
    with torch.no_grad():
        assert torch.equal(model(**inputs).last_hidden_state, loaded(**inputs).last_hidden_state)
    # a directory saved before the option existed loads without it
    path = tmp_path / "m" / "favor.json"
    meta = json.loads(path.read_text())
    del meta["performer"]["exact_window"], meta["performer"]["exact_sinks"]
    path.write_text(json.dumps(meta))
    assert all(not a.local for a in _adapters(fh.from_pretrained(tmp_path / "m")))


def _adapters(model):
    from favor.hf.adapter import FavorAdapter

    return [m for m in model.modules() if isinstance(m, FavorAdapter)]


def test_log_const_is_the_dense_features_mean_offset(tiny_bert):
    # E[phi(q).phi(k)] = exp(q.k + log_const): Monte Carlo over M = 2^16 features on small
    # inputs, where the relative spread of the estimate is ~1e-2 / sqrt(M / 1000) < 0.5 %
    model = fh.performerize(tiny_bert(), kernel="derf", num_features=1 << 16, calibration=[_inputs()])
    adapter = _adapters(model)[0]
    const = adapter.log_const(torch.float64)
    assert float(const.abs().max()) > 0.05  # a zero constant would pass the check below otherwise
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, adapter.heads, 4, adapter.dim, generator=g, dtype=torch.float64) * 0.1
    k = torch.randn(1, adapter.heads, 4, adapter.dim, generator=g, dtype=torch.float64) * 0.1
    qf, kf, scale = adapter.inputs(q, k, None)
    assert scale == 1.0
    est = adapter.feature_map.double().estimate_kernel(qf, kf)
    qx, kx = adapter.logit_inputs(q, k, None)
    ratio = est / torch.exp(qx @ kx.transpose(-1, -2) + const)
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=0.02)


@pytest.mark.parametrize("window", [-1, 2])
def test_bfloat16_model_runs_finite_and_near_float32(tiny_bert, window):
    # FAVOR computes in float32 whatever the model's dtype; bf16 weights and activations
    # differ from float32 by ~1e-2 relative, far below FAVOR's own error at this M
    inputs = _inputs()
    keep = inputs["attention_mask"].bool()
    outs = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = fh.performerize(
            tiny_bert().to(dtype), kernel="derf", num_features=64, calibration=[inputs], exact_window=window
        )
        with torch.no_grad():
            outs[dtype] = model(**inputs).last_hidden_state.float()
    assert bool(torch.isfinite(outs[torch.bfloat16]).all())
    err = (outs[torch.bfloat16] - outs[torch.float32])[keep].norm() / outs[torch.float32][keep].norm()
    assert float(err) < 0.05, float(err)


def _set_gains(model, seed):
    g = torch.Generator().manual_seed(seed)
    for a in _adapters(model):
        a.far_log_gain.copy_(torch.randn(a.heads, generator=g))


@pytest.mark.parametrize("kernel", ["positive", "derf"])
def test_far_gain_keeps_a_whole_window_softmax_and_scales_only_the_far_estimate(tiny_bert, kernel):
    # exp(far_log_gain) multiplies the far keys' estimate: with every key exact it changes
    # nothing (softmax), and otherwise the path equals the explicit reference whose far
    # weights are the features' estimate times that factor (float64, round-off only)
    inputs = _inputs()
    pad = ~inputs["attention_mask"].bool()
    keep = ~pad
    whole = fh.performerize(
        tiny_bert(), kernel=kernel, plain=True, num_features=8, calibration=[inputs], exact_window=12
    )
    _set_gains(whole, 1)
    for module, recorded in record_attention(whole, [inputs]).items():
        q, k, v, mask, scaling, _, _, _ = recorded[0]
        q, k, v = q.double(), k.double(), v.double()
        got, _ = favor_attention_forward(module, q, k, v, mask, scaling=scaling)
        torch.testing.assert_close(got[keep], _softmax_attention(q, k, v, keep, scaling)[keep], rtol=1e-6, atol=1e-6)
    model = fh.performerize(
        tiny_bert(), kernel=kernel, plain=True, num_features=16, calibration=[inputs], exact_window=1, exact_sinks=1
    )
    _set_gains(model, 2)
    for module, recorded in record_attention(model, [inputs]).items():
        q, k, v, mask, scaling, _, _, _ = recorded[0]
        q, k, v = q.double(), k.double(), v.double()
        got, _ = favor_attention_forward(module, q, k, v, mask, scaling=scaling)
        adapter = module.favor
        gain = adapter.far_log_gain.double().clone()
        adapter.far_log_gain.zero_()
        const = adapter.log_const(torch.float64)  # the features' own offset, without the gain
        adapter.far_log_gain.copy_(gain)
        qf, kf, scale = adapter.inputs(q, k, scaling, keep=keep)
        root = (q.shape[-1] ** -0.5 if scale is None else scale) ** 0.5
        far = adapter.feature_map.double().estimate_kernel(qf * root, kf * root) * gain.exp()[:, None, None]
        qx, kx = adapter.logit_inputs(q, k, scaling, keep=keep)
        ref = local_exact_reference(
            far, qx @ kx.transpose(-1, -2), v, window=1, sinks=1, log_const=const, key_padding_mask=pad
        ).transpose(1, 2)
        torch.testing.assert_close(got[keep], ref[keep], rtol=1e-9, atol=1e-9)


def test_fitting_moves_the_far_gain_and_save_load_keeps_it(tiny_bert, tmp_path):
    from favor.hf.fit import fit_adapters

    inputs = _inputs()
    model = fh.performerize(
        tiny_bert(), kernel="derf", plain=True, num_features=8, calibration=[inputs], exact_window=1
    )
    errors = fit_adapters(model, [inputs], steps=5)
    assert all(after < before for before, after in errors)
    assert all(float(a.far_log_gain.abs().max()) > 0 for a in _adapters(model))  # it was a parameter
    fh.save_pretrained(model, tmp_path / "m")
    loaded = fh.from_pretrained(tmp_path / "m")
    for a, b in zip(_adapters(model), _adapters(loaded), strict=True):
        assert torch.equal(a.far_log_gain, b.far_log_gain)
    # a directory saved before the gain existed loads with gain 0 (factor 1)
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "m" / "favor.safetensors"
    state = {k: v for k, v in load_file(str(weights)).items() if not k.endswith("far_log_gain")}
    save_file(state, str(weights))
    assert all(float(a.far_log_gain.abs().max()) == 0 for a in _adapters(fh.from_pretrained(tmp_path / "m")))
