"""The learnable far gain in favor's modules: FavorAttention(far_gain=) /
PerformerConfig(far_gain=) hold a per-head ``far_log_gain`` parameter; initialised to 0 the
module is bit-identical to the plain hybrid (outputs and weight gradients); a trained gain
still decodes token by token to the one-pass outputs; bad settings are refused by name. The
arithmetic itself is tested against the quadratic reference in
tests/ops/local/test_far_gain.py."""

from __future__ import annotations

import pytest
import torch

import favor
from favor.models import PerformerConfig, PerformerEncoder, PerformerLM
from favor.nn import FavorAttention

TERMS = favor.ExactTerms(3, 1, 1)


def _pair(causal, far_gain):
    kw = dict(causal=causal, exact=TERMS, generator=torch.Generator().manual_seed(0))
    plain = FavorAttention(32, 4, **kw).double()
    gained = FavorAttention(32, 4, far_gain=far_gain, **kw).double()
    missing = gained.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing == ["far_log_gain"]
    return plain, gained


@pytest.mark.parametrize("causal", [False, True])
def test_gain_zero_module_is_bit_identical_to_the_plain_hybrid(causal):
    plain, gained = _pair(causal, 0.0)
    x = torch.randn(2, 40, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    a, b = plain(x)[0], gained(x)[0]
    assert torch.equal(a, b)
    a.square().sum().backward()
    b.square().sum().backward()
    for name, p in plain.named_parameters():
        assert torch.equal(p.grad, gained.get_parameter(name).grad), name
    assert gained.far_log_gain.grad.abs().min() > 0  # the gain learns from the start
    assert "far_gain=learned" in repr(gained)


def test_a_trained_gain_decodes_as_one_pass_and_changes_the_numbers():
    plain, mod = _pair(True, 0.0)
    with torch.no_grad():
        mod.far_log_gain.copy_(torch.tensor([-2.0, -0.5, 0.0, 1.0]))
    x = torch.randn(2, 23, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    full, _ = mod(x)
    assert not torch.allclose(full, plain(x)[0])
    outs, state = [], None
    for piece in (x[:, :9], x[:, 9:10], x[:, 10:12], x[:, 12:]):  # chunked, step, step loop, chunked
        o, state = mod(piece, state=state, return_state=True)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)


def test_performer_models_carry_the_gain():
    cfg = PerformerConfig(vocab_size=17, dim=32, depth=2, heads=4, exact=TERMS, far_gain=-1.0)
    assert PerformerConfig.from_dict(cfg.to_dict()) == cfg
    old = cfg.replace(far_gain=None).to_dict()
    del old["far_gain"]  # a config saved before the option reads as no gain
    assert PerformerConfig.from_dict(old).far_gain is None
    model = PerformerLM(cfg).double().eval()
    names = [f"blocks.{i}.attn.far_log_gain" for i in range(2)]
    gains = [p for n, p in model.named_parameters() if n.endswith("far_log_gain")]
    assert len(gains) == 2 and all(torch.equal(g, torch.full((4,), -1.0, dtype=torch.float64)) for g in gains)
    idx = torch.randint(0, 17, (2, 5), generator=torch.Generator().manual_seed(0))
    out = model.generate(idx, 12, temperature=0)
    assert torch.equal(model(out[:, :-1])[:, 4:].argmax(-1), out[:, 5:])
    # same seed, same weights as the plain hybrid apart from the gain
    plain = PerformerEncoder(cfg.replace(far_gain=None))
    enc = PerformerEncoder(cfg.replace(far_gain=0.0))
    assert enc.load_state_dict(plain.state_dict(), strict=False).missing_keys == names
    tok = torch.randint(0, 17, (1, 30), generator=torch.Generator().manual_seed(3))
    assert torch.equal(enc(tok), plain(tok))


def test_far_gain_refused_by_name():
    with pytest.raises(ValueError, match="far_gain .* needs exact"):
        PerformerConfig(vocab_size=5, far_gain=0.0)
    with pytest.raises(ValueError, match="far_gain .* needs exact"):
        FavorAttention(8, 2, far_gain=0.0)
    for bad in (float("nan"), float("inf"), True, "0"):
        with pytest.raises(ValueError, match="far_gain must be None or a finite float"):
            PerformerConfig(vocab_size=5, exact=TERMS, far_gain=bad)
        with pytest.raises(ValueError, match="far_gain must be None or a finite float"):
            FavorAttention(8, 2, exact=TERMS, far_gain=bad)
