"""PerformerConfig(output_bias=True): a learnable per-token ``logit_bias`` added to the
logits of PerformerLM and of PerformerEncoder.logits. Zeros at first, so such a model gives
the bias-free model's outputs bit for bit; the default keeps the old state dict (checkpoints
written before the option load unchanged); a set bias shifts every position's logits,
decoding included."""

from __future__ import annotations

import pytest
import torch

import favor
from favor.models import PerformerConfig, PerformerEncoder, PerformerLM

CFG = PerformerConfig(vocab_size=19, dim=16, depth=2, heads=2)


def _tokens(seed=0, length=21):
    return torch.randint(0, 19, (2, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("exact", [None, favor.ExactTerms(4, sinks=1)])
def test_zero_bias_is_bit_identical_and_the_default_keeps_the_state_dict(exact):
    plain = PerformerLM(CFG.replace(exact=exact))
    biased = PerformerLM(CFG.replace(exact=exact, output_bias=True))
    assert "logit_bias" not in plain.state_dict()
    # same seed, same weights: the bias is the only new tensor and draws nothing at init
    assert biased.load_state_dict(plain.state_dict(), strict=False).missing_keys == ["logit_bias"]
    assert torch.equal(biased.logit_bias, torch.zeros(19))
    x = _tokens()
    a, b = plain(x), biased(x)
    assert torch.equal(a, b)
    a.square().sum().backward()
    b.square().sum().backward()
    for name, p in plain.named_parameters():
        assert torch.equal(p.grad, biased.get_parameter(name).grad), name
    assert biased.logit_bias.grad.abs().sum() > 0  # it learns from the start


def test_a_set_bias_shifts_the_logits_also_when_decoding():
    plain, model = PerformerLM(CFG), PerformerLM(CFG.replace(output_bias=True)).eval()
    model.load_state_dict(plain.state_dict(), strict=False)
    bias = torch.linspace(-3, 3, 19)
    with torch.no_grad():
        model.logit_bias.copy_(bias)
    x = _tokens(1, 9)
    full = model(x)
    torch.testing.assert_close(full, plain.eval()(x) + bias, rtol=0, atol=1e-6)
    outs, state = [], None
    for piece in (x[:, :4], x[:, 4:5], x[:, 5:]):
        o, state = model(piece, state=state, return_state=True)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)
    enc_plain, enc = PerformerEncoder(CFG), PerformerEncoder(CFG.replace(output_bias=True))
    with torch.no_grad():
        enc.logit_bias.copy_(bias)
    h = enc(x)
    assert torch.equal(h, enc_plain(x))  # the encoder's hidden states do not see the bias
    torch.testing.assert_close(enc.logits(h), enc_plain.logits(h) + bias, rtol=0, atol=1e-6)


def test_config_round_trip_old_configs_and_bad_values():
    cfg = CFG.replace(output_bias=True)
    assert PerformerConfig.from_dict(cfg.to_dict()) == cfg
    old = CFG.to_dict()
    del old["output_bias"]  # a config saved before the option reads as no bias
    assert PerformerConfig.from_dict(old).output_bias is False
    with pytest.raises(ValueError, match="output_bias must be a bool"):
        PerformerConfig(vocab_size=5, output_bias=1)
