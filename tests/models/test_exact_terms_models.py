"""Exact local terms inside favor's modules and models: FavorAttention(exact=) and
PerformerConfig(exact=) give favor.attention's numbers, decode token by token to the same
outputs as one pass (the ExactState ring), survive a config round-trip, and are refused by
name where not supported."""

from __future__ import annotations

import pytest
import torch

import favor
from favor.models import PerformerConfig, PerformerLM
from favor.nn import FavorAttention


def test_favor_attention_module_streams_with_exact_terms():
    torch.manual_seed(0)
    mod = FavorAttention(
        32, 4, causal=True, exact=favor.ExactTerms(3, 1, 2), generator=torch.Generator().manual_seed(0)
    )
    mod = mod.double()
    x = torch.randn(2, 23, 32, dtype=torch.float64)
    full, _ = mod(x)
    outs, state = [], None
    for piece in (x[:, :9], x[:, 9:10], x[:, 10:12], x[:, 12:]):
        o, state = mod(piece, state=state, return_state=True)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)
    assert isinstance(state.favor, favor.ExactState)
    assert "exact=ExactTerms(window=3, sinks=1, block=2)" in repr(mod)


def test_performer_lm_with_exact_terms_generates_as_it_scores():
    cfg = PerformerConfig(vocab_size=17, dim=32, depth=2, heads=4, exact={"window": 4, "sinks": 1, "block": 1})
    assert cfg.exact == favor.ExactTerms(4, 1, 1)
    assert PerformerConfig.from_dict(cfg.to_dict()) == cfg
    model = PerformerLM(cfg).double().eval()
    idx = torch.randint(0, 17, (2, 5), generator=torch.Generator().manual_seed(0))
    out = model.generate(idx, 12, temperature=0)
    # teacher-forced logits of the generated sequence pick the same tokens (greedy)
    logits = model(out[:, :-1])
    assert torch.equal(logits[:, 4:].argmax(-1), out[:, 5:])
    # the exact terms change the model's numbers (a no-op wiring would pass the test above)
    plain = PerformerLM(cfg.replace(exact=None)).double().eval()
    plain.load_state_dict(model.state_dict())
    assert not torch.allclose(plain(out), model(out))


def test_exact_terms_refused_by_name_where_unsupported():
    with pytest.raises(ValueError, match="exact terms are part of FAVOR"):
        PerformerConfig(vocab_size=5, attention="softmax", exact=favor.ExactTerms(2))
    with pytest.raises(ValueError, match="exact terms are part of FAVOR"):
        FavorAttention(8, 2, attention="softmax", exact=favor.ExactTerms(2))
    with pytest.raises(TypeError, match="exact must be"):
        PerformerConfig(vocab_size=5, exact=3)


def test_sequence_parallelism_refuses_exact_terms_by_name():
    from favor.distributed import sequence_parallel

    model = PerformerLM(PerformerConfig(vocab_size=11, dim=16, depth=1, heads=2, exact=favor.ExactTerms(4, 1)))
    with pytest.raises(ValueError, match="does not yet split attention with exact terms"):
        with sequence_parallel(model):
            pass
    # the refusal happens before any layer is switched: the model still runs on one process
    assert model(torch.zeros(1, 5, dtype=torch.long)).shape == (1, 5, 11)
