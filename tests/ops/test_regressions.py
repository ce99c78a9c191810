"""Regression tests for the bugs the property tests (test_properties.py, tests/nn,
tests/models, tests/hf) found, one named test each."""

import pytest
import torch

import favor
from favor.hf.adapter import FavorAdapter
from favor.hf.interface import favor_attention_forward
from tests.ops.test_paths_agree import make_fm, qkv, rel


def test_zero_head_dim_raises_value_error_not_zero_division(gen):
    # was: ZeroDivisionError from scale = 1/sqrt(D) in check_scale
    q = torch.zeros(2, 5, 0)
    with pytest.raises(ValueError, match="head dim D >= 1"):
        favor.attention(q, q, torch.zeros(2, 5, 3), favor.FeatureMap("elu"))
    with pytest.raises(ValueError, match="head dim D >= 1"):
        favor.step(None, q[:, 0], q[:, 0], torch.zeros(2, 3), favor.FeatureMap("elu"))


def test_step_validates_its_inputs_and_state(gen):
    # were: "mat1 and mat2 shapes cannot be multiplied", "size of tensor a must match",
    # "maximum(): argument 'input' must be Tensor", or a silent mixed-dtype result
    fm = make_fm("positive", d=4, m=8)
    q, k, v = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 3)
    with pytest.raises(TypeError, match="share a dtype"):
        favor.step(None, q, k, v, fm)
    v = v.double()
    with pytest.raises(ValueError, match="built for dim=4"):
        favor.step(None, q[:, :3], k[:, :3], v, fm)
    with pytest.raises(ValueError, match="do not broadcast"):
        favor.step(None, q, torch.cat([k] * 3), torch.cat([v] * 3), fm)
    _, state = favor.step(None, q, k, v, fm)
    with pytest.raises(TypeError, match="state must be a favor.State"):
        favor.step((1, 2, 3), q, k, v, fm)
    with pytest.raises(ValueError, match="state has shapes"):
        favor.step(state, q[:1], k[:1], v[:1], fm)
    with pytest.raises(ValueError, match="state has shapes"):
        favor.step(state, q, k, torch.cat([v, v], -1), fm)
    with pytest.raises(ValueError, match="state is on"):
        favor.step(state.to("meta"), q, k, v, fm)


def test_initial_state_on_another_device_raises_naming_it(gen):
    # was: "Tensor on device meta is not on the expected device cpu!" from inside the kernel
    fm = make_fm("positive")
    q, k, v = qkv(gen)
    state = favor.State.empty((2, 3), 16, 5, device="meta")
    with pytest.raises(ValueError, match="initial_state is on"):
        favor.attention(q, k, v, fm, causal=True, initial_state=state)


@pytest.mark.parametrize("kernel", ["positive", "elu", "oprf"])
def test_empty_causal_sequence_stays_in_the_autograd_graph(gen, kernel):
    # was: "element 0 of tensors does not require grad" on backward through an empty batch
    fm = make_fm(kernel)
    q, k, v = (t.requires_grad_() for t in qkv(gen, lq=0, lk=0))
    out = favor.attention(q, k, v, fm, causal=True)
    assert out.shape == (2, 3, 0, 5) and out.requires_grad
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


@pytest.mark.parametrize("kernel", ["positive", "trig"])
def test_official_stabilizer_on_empty_sequences(gen, kernel):
    # was: "amax(): Expected reduction dim -2 to have non-zero size" from the key max
    fm = make_fm(kernel, stabilizer="official")
    q, k, v = qkv(gen, lq=0, lk=0)
    assert favor.attention(q, k, v, fm, causal=True).shape == (2, 3, 0, 5)
    q4, k0, v0 = qkv(gen, lq=4, lk=0)
    out = favor.attention(q4, k0, v0, fm)
    assert torch.equal(out, torch.zeros(2, 3, 4, 5, dtype=out.dtype))  # no visible key: 0
    q0, k4, v4 = qkv(gen, lq=0, lk=4)
    assert favor.attention(q0, k4, v4, fm).shape == (2, 3, 0, 5)


def test_causal_chunk_longer_than_the_sequence_allocates_nothing_extra(gen):
    # was: every block padded to chunk * BLOCK_CHUNKS rows: chunk_size=10**9 on L=13 tried
    # to allocate hundreds of GB
    fm = make_fm("positive")
    q, k, v = (t.requires_grad_() for t in qkv(gen))
    out = favor.attention(q, k, v, fm, causal=True, chunk_size=10**9)
    assert rel(out, favor.kernel_attention(q, k, v, fm, causal=True)) < 1e-10
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_hf_attention_rejects_non_4d_inputs_naming_them():
    # was: "not enough values to unpack (expected 4, got 3)"
    fm = favor.FeatureMap("positive", dim=4, num_features=4)
    layer = torch.nn.Module()
    layer.favor = FavorAdapter(fm, heads=1, dim=4)
    x = torch.randn(1, 1, 3, 4)
    with pytest.raises(ValueError, match="query must be a 4D tensor"):
        favor_attention_forward(layer, x[0], x, x, None)
    with pytest.raises(ValueError, match="key and value must share"):
        favor_attention_forward(layer, x, x, x[..., :2, :], None)


def test_lm_token_ids_out_of_range_raise_naming_idx():
    # was: IndexError "index out of range in self" from the embedding (a device-side assert
    # on a GPU); and a wrong state list gave AttributeError "'NoneType' has no attribute 'position'"
    from favor.models import PerformerConfig, PerformerLM

    lm = PerformerLM(PerformerConfig(vocab_size=11, dim=16, depth=1, heads=2, max_len=64))
    for bad in (11, -1):
        with pytest.raises(ValueError, match=r"idx must hold token ids in \[0, vocab_size=11\)"):
            lm(torch.tensor([[1, bad]]))
    with pytest.raises(TypeError, match="AttentionState"):
        lm(torch.tensor([[1]]), state=[None])


@pytest.mark.parametrize("kernel", ["positive", "oprf", "relu"])
@pytest.mark.parametrize("mode", ["bidirectional", "causal", "streamed steps"])
def test_a_trained_projection_gets_its_gradient_on_every_path(gen, kernel, mode):
    # was: the fast and step paths' hand-written backward returned no gradient for the
    # projection (a buffer a user or favor.hf's adapter fitting may train): with only the
    # projection requiring grad the output had no graph at all, silently
    fm = make_fm(kernel, d=8, m=16).double()  # a float64 gradient: 1e-9 is round-off there
    fm.projection.requires_grad_(True)
    q, k, v = qkv(gen, lq=9, lk=9)
    w = torch.randn(*q.shape[:-1], v.shape[-1], generator=gen, dtype=torch.float64)
    causal = mode != "bidirectional"
    ref = favor.kernel_attention(q, k, v, fm, causal=causal)
    if mode == "streamed steps":  # a prefix as one call, then the last 2 positions as steps
        _, state = favor.attention(q[..., :7, :], k[..., :7, :], v[..., :7, :], fm, causal=True, return_state=True)
        got = favor.attention(
            q[..., 7:, :], k[..., 7:, :], v[..., 7:, :], fm, causal=True, initial_state=state, return_state=True
        )[0]
        ref, w = ref[..., 7:, :], w[..., 7:, :]
    else:
        got = favor.attention(q, k, v, fm, causal=causal)
    assert got.requires_grad
    (g_ref,) = torch.autograd.grad((ref * w).sum(), fm.projection)
    (g_got,) = torch.autograd.grad((got * w).sum(), fm.projection)
    assert rel(got, ref) < 1e-10
    # float64; the paths differ in summation order only
    assert rel(g_got, g_ref) < 1e-9, rel(g_got, g_ref)
