"""PerformerEncoder / PerformerLM: configs, step == forward, generation, masks, causality."""

import dataclasses

import pytest
import torch

from favor.models import PerformerConfig, PerformerEncoder, PerformerLM

V = 28


def _cfg(**kw):
    base = {"vocab_size": V, "dim": 32, "depth": 2, "heads": 4, "max_len": 64}
    base.update(kw)
    return PerformerConfig(**base)


def test_config_is_frozen_and_validated():
    c = _cfg()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.dim = 64
    with pytest.raises(ValueError, match="divisible by heads"):
        _cfg(dim=30, heads=4)
    with pytest.raises(ValueError, match="kernel must be one of"):
        _cfg(kernel="gauss")
    with pytest.raises(ValueError, match="unknown model config keys"):
        PerformerConfig.from_dict({**c.to_dict(), "width": 3})
    assert PerformerConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"kernel": "relu"},
        {"kernel": "trig", "position": "learned"},
        {"kernel": "oprf"},
        {"attention": "softmax"},
        {"tie_embeddings": False, "position": "none"},
    ],
)
def test_token_by_token_logits_equal_full_forward(device, kw):
    torch.manual_seed(0)
    model = PerformerLM(_cfg(**kw)).double().eval().to(device)
    idx = torch.randint(0, V, (2, 20)).to(device)
    full = model(idx)
    logits, state = model(idx[:, :7], return_state=True)
    outs = [logits]
    for t in range(7, 20):
        logits, state = model(idx[:, t : t + 1], state=state)
        outs.append(logits)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)


def test_lm_is_causal():
    model = PerformerLM(_cfg()).double()
    a = torch.randint(0, V, (1, 16))
    b = a.clone()
    b[0, 10:] = (b[0, 10:] + 1) % V
    torch.testing.assert_close(model(a)[:, :10], model(b)[:, :10], rtol=0, atol=0)


def test_generate_greedy_matches_naive_full_recompute(device):
    model = PerformerLM(_cfg(seed=3)).double().eval().to(device)
    prompt = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(1)).to(device)
    out = model.generate(prompt, 12, temperature=0)
    naive = prompt
    for _ in range(12):
        naive = torch.cat([naive, model(naive)[:, -1].argmax(-1, keepdim=True)], 1)
    assert out.shape == (2, 17) and torch.equal(out, naive)


def test_generate_sampling_is_seeded_and_respects_top_k():
    model = PerformerLM(_cfg()).eval()
    prompt = torch.zeros(1, 3, dtype=torch.long)
    a = model.generate(prompt, 30, generator=torch.Generator().manual_seed(0))
    b = model.generate(prompt, 30, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    top1 = model.generate(prompt, 10, top_k=1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(top1, model.generate(prompt, 10, temperature=0))
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(prompt, -1)


def test_same_seed_same_model_and_softmax_baseline_same_size():
    a, b = PerformerLM(_cfg(seed=1)), PerformerLM(_cfg(seed=1))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb
        torch.testing.assert_close(va, vb, rtol=0, atol=0, equal_nan=True)  # rho is nan (data-adaptive)
    soft = PerformerLM(_cfg(attention="softmax"))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(soft) == count(a)
    assert "head.weight" not in a.state_dict()  # tied


def test_encoder_padding_mask_and_shape():
    enc = PerformerEncoder(_cfg()).double()
    x = torch.randint(0, V, (1, 6))
    padded = torch.cat([x, torch.zeros(1, 4, dtype=torch.long)], 1)
    mask = torch.tensor([[False] * 6 + [True] * 4])
    h = enc(x)
    hp = enc(padded, key_padding_mask=mask)
    assert h.shape == (1, 6, 32)
    torch.testing.assert_close(hp[:, :6], h, rtol=1e-12, atol=1e-12)
    # bidirectional: a later token changes earlier outputs
    y = x.clone()
    y[0, -1] = (y[0, -1] + 1) % V
    assert not torch.allclose(enc(y)[:, 0], h[:, 0])


def test_learned_positions_refuse_beyond_max_len():
    model = PerformerLM(_cfg(position="learned", max_len=8))
    with pytest.raises(ValueError, match="max_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="idx must be an integer tensor"):
        model(torch.zeros(1, 4))
