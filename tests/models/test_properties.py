"""Property tests (hypothesis) of PerformerLM decoding over random tiny configurations
(kernel, position, depth, heads, tied embeddings, chunk size), prompts and lengths:

- logits from a prefill in random pieces and then one token at a time (the recurrent
  state, favor.step) equal the full forward pass (float64, 1e-10: the paths agree to
  round-off, see tests/ops/test_paths_agree.py);
- greedy generate() equals the naive loop that re-runs the whole prefix every token;
- float16 / bfloat16 models decode to finite logits of their dtype;
- bad tokens and states raise ValueError / TypeError naming the argument.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from favor.models import PerformerConfig, PerformerLM
from tests.ops.test_properties import KERNELS, rel


@st.composite
def models(draw):
    heads = draw(st.integers(1, 2))
    position = draw(st.sampled_from(["rotary", "learned", "none"]))
    head_dim = draw(st.sampled_from([2, 4]))
    kernel = draw(st.sampled_from(KERNELS))
    config = PerformerConfig(
        vocab_size=draw(st.integers(2, 20)),
        dim=heads * head_dim,
        depth=draw(st.integers(1, 2)),
        heads=heads,
        mlp_ratio=1.0,
        kernel=kernel,
        num_features=None if kernel == "elu" else draw(st.integers(1, 8)),
        projection=draw(st.sampled_from(["orthogonal", "iid"])),
        position=position,
        max_len=32,
        tie_embeddings=draw(st.booleans()),
        chunk_size=draw(st.one_of(st.none(), st.integers(1, 7))),
        seed=draw(st.integers(0, 2**16)),
    )
    model = PerformerLM(config).double().eval()
    if kernel == "oprf":  # one fixed A on the parallel and the recurrent path
        for block in model.blocks:
            block.attn.feature_map.rho.fill_(draw(st.floats(0.0, 2.0)))
    return model


@given(data=st.data())
def test_pieces_then_tokens_equal_full_forward(device, data):
    model = data.draw(models()).to(device)
    b, length = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 16))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    idx = torch.randint(0, model.config.vocab_size, (b, length), generator=g).to(device)
    full = model(idx)
    prefill = data.draw(st.integers(1, length))
    cuts = sorted(data.draw(st.lists(st.integers(1, prefill), max_size=3)))
    bounds = sorted({0, *cuts, prefill})
    outs, state = [], None
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        logits, state = model(idx[:, lo:hi], state=state, return_state=True)
        outs.append(logits)
    for t in range(prefill, length):
        logits, state = model(idx[:, t : t + 1], state=state)
        outs.append(logits)
    assert all(s.position == length for s in state)
    assert rel(torch.cat(outs, 1), full) < 1e-10


@given(data=st.data())
def test_greedy_generate_equals_naive_recompute(device, data):
    model = data.draw(models()).to(device)
    b, prompt_len = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 6))
    steps = data.draw(st.integers(0, 8))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    prompt = torch.randint(0, model.config.vocab_size, (b, prompt_len), generator=g).to(device)
    out = model.generate(prompt, steps, temperature=0)
    naive = prompt
    for _ in range(steps):
        logits = model(naive)[:, -1]
        top2 = logits.topk(min(2, logits.shape[-1]), -1).values
        # a near-tie could go either way on round-off: such a case says nothing
        if top2.shape[-1] == 2 and bool(((top2[:, 0] - top2[:, 1]) < 1e-9).any()):
            return
        naive = torch.cat([naive, logits.argmax(-1, keepdim=True)], 1)
    assert out.shape == (b, prompt_len + steps) and torch.equal(out, naive)


@given(data=st.data(), dtype=st.sampled_from([torch.float16, torch.bfloat16]))
def test_half_precision_decoding_is_finite(device, data, dtype):
    model = data.draw(models()).to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    idx = torch.randint(0, model.config.vocab_size, (2, data.draw(st.integers(1, 8))), generator=g).to(device)
    logits, state = model(idx, return_state=True)
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    for _ in range(3):
        logits, state = model(logits[:, -1:].argmax(-1), state=state)
        assert logits.dtype == dtype and torch.isfinite(logits).all()
    out = model.generate(idx, 4, temperature=0)
    assert out.shape == (2, idx.shape[1] + 4)


def _bad_lm_cases(model, idx):
    v, depth = model.config.vocab_size, model.config.depth
    first = torch.arange(idx.numel()).view_as(idx) == 0  # one bad id among good ones
    return {
        "idx float": (dict(idx=idx.float()), ValueError, "idx must be an integer tensor"),
        "idx 1-d": (dict(idx=idx[0]), ValueError, "idx must be an integer tensor"),
        "idx list": (dict(idx=idx.tolist()), ValueError, "idx must be an integer tensor"),
        "id = vocab_size": (dict(idx=torch.where(first, v, idx)), ValueError, "vocab_size"),
        "id < 0": (dict(idx=idx - 1 - idx.max()), ValueError, "vocab_size"),
        "state length": (dict(state=[None] * (depth + 1)), ValueError, "state"),
        "state entries": (dict(state=[None] * depth), TypeError, "state"),
        "state type": (dict(state="state"), ValueError, "state"),
    }


_LM_CASES = list(
    _bad_lm_cases(
        PerformerLM(PerformerConfig(vocab_size=3, dim=4, depth=1, heads=1)), torch.zeros(1, 1, dtype=torch.long)
    )
)


@pytest.mark.parametrize("case", _LM_CASES)
@given(data=st.data())
@settings(max_examples=3)
def test_bad_lm_input_raises_naming_the_argument(case, data):
    model = data.draw(models())
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    idx = torch.randint(
        0, model.config.vocab_size, (data.draw(st.integers(1, 2)), data.draw(st.integers(1, 5))), generator=g
    )
    over, err, text = _bad_lm_cases(model, idx)[case]
    args = dict(idx=idx)
    args.update(over)
    with pytest.raises(err) as info:
        model(args.pop("idx"), **args)
    assert text in str(info.value), str(info.value)
