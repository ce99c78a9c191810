"""Causal means causal; pieces and single tokens give what one pass gives."""

import pytest
import torch

import favor
from tests.conftest import randn
from tests.ops.test_paths_agree import KERNELS, make_fm, qkv, rel


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("chunk", [1, 3, 8, 64])
def test_future_tokens_do_not_move_past_outputs_bitwise(gen, kernel, chunk):
    fm = make_fm(kernel)
    q, k, v = qkv(gen, lq=20, lk=20, dtype=torch.float32)
    t = 9
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    # a violent change after t: 5x larger keys would move a sequence-wide key max (the
    # official code's leak) by a lot
    q2[..., t + 1 :, :] = randn(gen, 2, 3, 10, 8, dtype=torch.float32) * 5
    k2[..., t + 1 :, :] = randn(gen, 2, 3, 10, 8, dtype=torch.float32) * 5
    v2[..., t + 1 :, :] = randn(gen, 2, 3, 10, 5, dtype=torch.float32) * 5
    a = favor.attention(q, k, v, fm, causal=True, chunk_size=chunk)
    b = favor.attention(q2, k2, v2, fm, causal=True, chunk_size=chunk)
    assert torch.equal(a[..., : t + 1, :], b[..., : t + 1, :])
    assert not torch.equal(a[..., t + 1 :, :], b[..., t + 1 :, :])


def test_official_stabilizer_does_leak(gen):
    # documents why "official" is not the default: the key max over the whole sequence
    fm = make_fm("positive", stabilizer="official")
    q, k, v = qkv(gen, lq=20, lk=20, std=1.0)
    k2 = k.clone()
    k2[..., 10:, :] *= 2.5
    a = favor.attention(q, k, v, fm, causal=True)
    b = favor.attention(q, k2, v, fm, causal=True)
    assert rel(a[..., :10, :], b[..., :10, :]) > 1e-3


@pytest.mark.parametrize("kernel", KERNELS)
def test_truncated_sequence_gives_same_prefix(gen, kernel):
    fm = make_fm(kernel)
    q, k, v = qkv(gen, lq=21, lk=21)
    full = favor.attention(q, k, v, fm, causal=True, chunk_size=4)
    part = favor.attention(q[..., :10, :], k[..., :10, :], v[..., :10, :], fm, causal=True, chunk_size=4)
    assert rel(part, full[..., :10, :]) < 1e-12


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("cuts", [(5,), (1, 2, 3), (7, 8, 15)])
def test_pieces_equal_one_pass(gen, kernel, cuts):
    fm = make_fm(kernel)
    q, k, v = qkv(gen, lq=21, lk=21)
    full = favor.attention(q, k, v, fm, causal=True, chunk_size=4)
    state, outs, bounds = None, [], [0, *cuts, 21]
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        out, state = favor.attention(
            q[..., a:b, :],
            k[..., a:b, :],
            v[..., a:b, :],
            fm,
            causal=True,
            chunk_size=3,
            initial_state=state,
            return_state=True,
        )
        outs.append(out)
    assert rel(torch.cat(outs, -2), full) < 1e-10


@pytest.mark.parametrize("kernel", KERNELS)
def test_token_by_token_equals_one_pass(gen, device, kernel):
    fm = make_fm(kernel).to(device)
    q, k, v = (t.to(device) for t in qkv(gen, lq=17, lk=17))
    full = favor.attention(q, k, v, fm, causal=True)
    # a prompt through the chunked path, then single tokens through step()
    out, state = favor.attention(q[..., :6, :], k[..., :6, :], v[..., :6, :], fm, causal=True, return_state=True)
    outs = [out]
    for t in range(6, 17):
        o, state = favor.step(state, q[..., t, :], k[..., t, :], v[..., t, :], fm)
        outs.append(o[..., None, :])
    assert rel(torch.cat(outs, -2), full) < 1e-10
    # and from an empty state
    state, outs = None, []
    for t in range(17):
        o, state = favor.step(state, q[..., t, :], k[..., t, :], v[..., t, :], fm)
        outs.append(o)
    assert rel(torch.stack(outs, -2), full) < 1e-10


def test_state_shapes_and_dtype_for_half_inputs(gen):
    fm = make_fm("positive")
    q, k, v = qkv(gen, dtype=torch.float32)
    out, state = favor.attention(q.half(), k.half(), v.half(), fm, causal=True, return_state=True)
    assert out.dtype == torch.float16
    assert state.kv.dtype == torch.float32 and state.kv.shape == (2, 3, 16, 5)
    assert state.z.shape == (2, 3, 16) and state.log_scale.shape == (2, 3)


def test_state_absorbs_keys_of_any_magnitude(gen):
    # a key with log scale ~ +500 after a prompt of tiny keys: rescaling, not overflow
    fm = make_fm("positive")
    q, k, v = qkv(gen, lq=8, lk=8, dtype=torch.float32, std=0.1)
    _, state = favor.attention(q, k, v, fm, causal=True, return_state=True)
    big = randn(gen, 2, 3, 8, dtype=torch.float32, std=1.0)
    big = big / big.norm(dim=-1, keepdim=True) * 60
    out, state = favor.step(state, big, big, randn(gen, 2, 3, 5, dtype=torch.float32), fm)
    assert torch.isfinite(out).all() and torch.isfinite(state.kv).all()


@pytest.mark.parametrize("kernel", ["positive", "oprf"])
def test_step_follows_a_redraw_and_a_new_rho_and_stays_picklable(gen, kernel):
    """step() keeps its features from token to token; a redraw in place (or, for FAVOR++, a
    new rho) must still give the new map's outputs, and the map must still pickle."""
    import pickle

    fm = make_fm(kernel)
    q, k, v = qkv(gen, lq=5, lk=5)
    state = None
    for t in range(3):
        _, state = favor.step(state, q[..., t, :], k[..., t, :], v[..., t, :], fm)
    before, _ = favor.step(state, q[..., 3, :], k[..., 3, :], v[..., 3, :], fm)
    changes = [lambda: fm.redraw(generator=torch.Generator().manual_seed(7))]
    if kernel == "oprf":
        changes.append(lambda: fm.rho.fill_(0.3))
    for change in changes:
        change()
        got, _ = favor.step(state, q[..., 3, :], k[..., 3, :], v[..., 3, :], fm)
        fresh = pickle.loads(pickle.dumps(fm))  # a copy that has never stepped
        want, _ = favor.step(state, q[..., 3, :], k[..., 3, :], v[..., 3, :], fresh)
        assert torch.equal(got, want)
        assert not torch.equal(got, before)
        before = got
