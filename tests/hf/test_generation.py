"""Constant-size generation (favor.hf.cache): a FavorCache gives the teacher-forced pass's
logits (float64, 1e-10) for eight decoder families, plain FAVOR and exact local terms, with
the prompt in one call or in pieces, left padding, greedy and beam search through
``model.generate``; its bytes do not depend on the context length; what it cannot do raises."""

import pytest
import torch
from transformers import DynamicCache

import favor.hf as fh
from tests.hf._decoders import FAMILIES, VOCAB, tiny_decoder

#: plain FAVOR (FAVOR++, uncalibrated) and exact local terms: 2 neighbours and 3 sinks, so
#: that the sinks fill across the pieces of a prompt and the window straddles calls
#: plain FAVOR++, with exact local terms, and performerize's defaults (derf, window 8, 1 sink)
VARIANTS = {
    "plain": {"kernel": "oprf", "plain": True},
    "local": {"kernel": "oprf", "plain": True, "exact_window": 2, "exact_sinks": 3},
    "defaults": {},
}


def _model(family: str, variant: str, seed: int = 0):
    return fh.performerize(tiny_decoder(family, seed), num_features=32, seed=seed, **VARIANTS[variant])


def _batch(length: int, *, seed: int, left_pad: int = 3):
    """Two rows of random tokens; row 1 left-padded by ``left_pad`` (as batched generation
    pads); position ids as ``generate`` derives them from the mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, length), generator=g)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, :left_pad] = 0
    ids[1, :left_pad] = 0
    return ids, mask, _positions(mask)


def _positions(mask):
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def _teacher_forced(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits


def _pieces(model, ids, mask, pos, sizes):
    """Logits from a FavorCache fed ``sizes`` tokens per call; and its bytes after each call."""
    cache, logits, sizes_seen, start = fh.FavorCache(model), [], [], 0
    with torch.no_grad():
        for n in sizes:
            end = start + n
            out = model(
                input_ids=ids[:, start:end],
                attention_mask=mask[:, :end],
                position_ids=pos[:, start:end],
                cache=cache,
                use_cache=True,
            )
            assert out.cache is cache
            logits.append(out.logits)
            sizes_seen.append(cache.nbytes)
            start = end
    return torch.cat(logits, 1), sizes_seen, cache


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cached_logits_equal_teacher_forcing(family, variant):
    model = _model(family, variant)
    ids, mask, pos = _batch(12, seed=1)
    ref = _teacher_forced(model, ids, mask)
    for sizes in ([8, 1, 1, 1, 1], [2, 4, 1, 3, 1, 1]):  # prompt in one call, then in pieces
        got, nbytes, cache = _pieces(model, ids, mask, pos, sizes)
        # the same sums in another order (chunked vs recurrent, other chunk boundaries): float64 round-off
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
        assert len(set(nbytes)) == 1 and nbytes[0] > 0, nbytes  # constant from the first call on
        assert cache.get_seq_length() == 12


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cache_bytes_do_not_depend_on_the_context(variant):
    model = _model("llama", variant)
    sizes = []
    for length in (4, 40, 100):
        ids, mask, pos = _batch(length + 1, seed=2)
        _, nbytes, cache = _pieces(model, ids, mask, pos, [length, 1])
        sizes.append(nbytes[-1])
        # no tensor in the cache grows with the context: only (B, H, M', Dv)-sized state and W / S slots
        assert all(length + 1 not in t.shape for layer in cache.layers for t in layer.tensors())
    assert len(set(sizes)) == 1, sizes


class _Logits:
    """Records the float64 logits of every forward pass of ``model`` (``generate`` casts its
    own scores to float32)."""

    def __init__(self, model):
        self.steps = []
        self.handle = model.get_output_embeddings().register_forward_hook(
            lambda _m, _i, out: self.steps.append(out[:, -1].detach().clone())
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _generate(model, ids, mask, **kwargs):
    with _Logits(model) as rec, torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=5,
            min_new_tokens=5,
            return_dict_in_generate=True,
            pad_token_id=0,
            **kwargs,
        )
    return out, torch.stack(rec.steps, 1)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_generate_uses_the_cache_and_equals_teacher_forcing(family, variant):
    model = _model(family, variant)
    ids, mask, _ = _batch(6, seed=3)
    out, steps = _generate(model, ids, mask, do_sample=False)
    assert isinstance(out.cache, fh.FavorCache)
    seq = out.sequences
    full_mask = torch.cat([mask, torch.ones(2, seq.shape[1] - ids.shape[1], dtype=mask.dtype)], 1)
    ref = _teacher_forced(model, seq, full_mask)[:, ids.shape[1] - 1 : -1]  # the logits each token was picked from
    torch.testing.assert_close(steps, ref, rtol=1e-10, atol=1e-10)
    # greedy picked the teacher-forced argmax (min_new_tokens keeps the end token, id 2, out)
    assert torch.equal(seq[:, ids.shape[1] :], ref.index_fill(-1, torch.tensor([2]), float("-inf")).argmax(-1))


@pytest.mark.parametrize("family,variant", [("llama", "plain"), ("llama", "local"), ("gpt2", "local")])
def test_beam_search_equals_the_full_key_value_cache(family, variant, monkeypatch):
    model = _model(family, variant)
    ids, mask, _ = _batch(5, seed=4)
    reorders = []
    original = fh.FavorLayer.reorder_cache
    monkeypatch.setattr(fh.FavorLayer, "reorder_cache", lambda self, idx: (reorders.append(idx), original(self, idx)))
    kwargs = dict(do_sample=False, num_beams=3, num_return_sequences=2)
    out, steps = _generate(model, ids, mask, **kwargs)
    # the reference: favor attention over a DynamicCache, which recomputes from all keys (no state to reorder)
    ref, ref_steps = _generate(model, ids, mask, cache=DynamicCache(config=model.config), **kwargs)
    assert reorders and isinstance(out.cache, fh.FavorCache)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(steps, ref_steps, rtol=1e-10, atol=1e-10)


def test_sampling_equals_the_full_key_value_cache():
    model = _model("qwen2", "local")
    ids, mask, _ = _batch(5, seed=5)
    torch.manual_seed(0)
    out, steps = _generate(model, ids, mask, do_sample=True, top_k=0, temperature=1.0)
    torch.manual_seed(0)
    ref, ref_steps = _generate(
        model, ids, mask, do_sample=True, top_k=0, temperature=1.0, cache=DynamicCache(config=model.config)
    )
    assert isinstance(out.cache, fh.FavorCache) and torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(steps, ref_steps, rtol=1e-10, atol=1e-10)


def test_what_the_cache_cannot_do_raises():
    model = _model("llama", "local")
    ids, mask, pos = _batch(6, seed=6)
    _, _, cache = _pieces(model, ids, mask, pos, [6])
    with pytest.raises(ValueError, match=r"crop\(-2\)"):
        cache.crop(-2)
    cache.crop(0)  # nothing to undo: allowed
    with pytest.raises(ValueError, match="rollback"):
        cache.activate_past_recording()
    with pytest.raises(ValueError, match="assisted"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, assistant_model=_model("llama", "local", seed=1))
    with pytest.raises(ValueError, match="cache_implementation"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, cache_implementation="static")


def test_a_favor_cache_refuses_attention_that_is_not_favor():
    model = _model("llama", "plain")
    ids, mask, pos = _batch(6, seed=7)
    _, _, cache = _pieces(model, ids, mask, pos, [6])
    model.set_attn_implementation("sdpa")  # softmax over the new token only would be silently wrong
    with pytest.raises(RuntimeError, match="attn_implementation='sdpa'"):
        model(input_ids=ids[:, :1], cache=cache, use_cache=True)
    # a layer whose update never reaches favor's attention function (a cache without the model's config)
    bare = fh.FavorCache()
    k = torch.zeros(1, 2, 1, 8, dtype=torch.float64)
    bare.update(k, k, 0)
    with pytest.raises(RuntimeError, match="layer 0's keys never reached"):
        bare.update(k, k, 1)


def test_generate_without_favor_or_with_a_given_cache_is_untouched():
    model = _model("llama", "plain")
    ids, mask, _ = _batch(5, seed=8)
    out, _ = _generate(model, ids, mask, do_sample=False, cache=DynamicCache(config=model.config))
    assert type(out.cache) is DynamicCache
    model.set_attn_implementation("sdpa")
    out, _ = _generate(model, ids, mask, do_sample=False)
    assert type(out.cache) is DynamicCache


def test_batch_select_and_repeat_keep_each_row_exact():
    model = _model("llama", "local")
    ids, mask, pos = _batch(9, seed=9)
    ref = _teacher_forced(model, ids, mask)
    _, _, cache = _pieces(model, ids[:, :6], mask[:, :6], pos[:, :6], [6])
    cache.batch_select_indices(torch.tensor([1]))  # keep the left-padded row only
    cache.batch_repeat_interleave(2)  # and run it twice
    with torch.no_grad():
        out = model(
            input_ids=ids[1:, 6:].repeat(2, 1),
            attention_mask=mask[1:].repeat(2, 1),
            position_ids=pos[1:, 6:].repeat(2, 1),
            cache=cache,
            use_cache=True,
        ).logits
    torch.testing.assert_close(out, ref[1:, 6:].repeat(2, 1, 1), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("local", [False, True])
def test_calibrated_dense_features_decode_exactly(local):
    # derf: reparametrised, augmented inputs and a per-head log constant (adapter.py)
    ids, mask, pos = _batch(12, seed=10)
    options = {"exact_window": 1, "exact_sinks": 2} if local else {}
    model = fh.performerize(
        tiny_decoder("llama"), kernel="derf", num_features=32, calibration=[{"input_ids": ids}], **options
    )
    ref = _teacher_forced(model, ids, mask)
    got, nbytes, _ = _pieces(model, ids, mask, pos, [3, 5, 1, 2, 1])
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    assert len(set(nbytes)) == 1


def test_the_prompt_takes_the_chunked_path_and_each_token_the_step(monkeypatch):
    from favor.ops import api

    model = _model("llama", "plain")
    ids, mask, _ = _batch(8, seed=11)
    calls = []

    def spy(name, query_at, real):
        def run(*a, **kw):
            calls.append((name, a[query_at].shape[-2]))
            return real(*a, **kw)

        return run

    # causal_fast(q, ...), steps(state, q, ...)
    monkeypatch.setattr(api, "causal_fast", spy("causal_fast", 0, api.causal_fast))
    monkeypatch.setattr(api, "steps", spy("steps", 1, api.steps))
    _generate(model, ids, mask, do_sample=False)
    layers = model.config.num_hidden_layers
    # prefill: every layer once through the chunked kernel; then 4 tokens (the 5th is never fed back) by the step
    assert calls == [("causal_fast", 8)] * layers + [("steps", 1)] * (4 * layers)


def test_decoding_with_a_non_favor_cache_warns_once(caplog, monkeypatch):
    """A hand-written decoding loop gets transformers' DynamicCache by default: the numbers
    are right but every token recomputes FAVOR over the whole prefix, so say how to get O(1)."""
    import favor.hf.interface as fa

    monkeypatch.setattr(fa, "_warned_kv_cache", False)
    model = _model("llama", "plain")
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), caplog.at_level("WARNING", logger="favor.hf.interface"):
        out = model(input_ids=ids[:, :10], cache=DynamicCache(config=model.config), use_cache=True)
        assert "FavorCache" not in caplog.text  # a prompt alone is not a decoding step
        for t in (10, 11):
            out = model(input_ids=ids[:, t : t + 1], cache=out.cache, use_cache=True)
    assert caplog.text.count("cache=favor.hf.FavorCache(model)") == 1
