"""Every architecture of tests/hf/architectures.py is what its row says: supported (an exact
window covering the sequence gives the softmax model, float64, 1e-10; decoders decode token
by token as in teacher forcing) or refused with the message it names. Also: every keyword
that reaches favor's attention function is allowed or refused on purpose, cross-attention
takes plain FAVOR, and docs/hf.md's table is the one these rows print."""

import logging
import re
from pathlib import Path

import pytest
import torch

import favor.hf as fh
from favor.hf.fit import record_attention
from favor.hf.interface import favor_attention_forward
from favor.hf.refusals import PASSING, REFUSED, UnsupportedAttentionError, check_keywords
from tests.hf._batches import decoded_logits
from tests.hf.architectures import ARCHITECTURES, CHECK, VOCAB, by_name, table

SUPPORTED = [a for a in ARCHITECTURES if a.refused is None]
REFUSED_ROWS = [a for a in ARCHITECTURES if a.refused is not None]
DECODERS = [a for a in SUPPORTED if a.kind == "decoder"]

#: float64 models, every weight exact: round-off only (the same sums in another order)
TOL = dict(rtol=1e-10, atol=1e-10)


@pytest.fixture(autouse=True)
def _quiet():
    # tiny configs make transformers warn about token ids and generation defaults
    logging.getLogger("transformers").setLevel(logging.ERROR)


def _inputs(kind: str) -> dict:
    g = torch.Generator().manual_seed(5)
    if kind == "vision encoder":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64)}
    ids = torch.randint(3, VOCAB, (2, 10), generator=g)
    mask = torch.ones(2, 10, dtype=torch.long)
    if kind == "decoder":
        mask[1, :3] = 0  # left padding, as batched generation pads
    else:
        mask[1, 7:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if kind == "encoder-decoder":
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (2, 7), generator=g)
    return inputs


def _outputs(model, inputs) -> dict:
    with torch.no_grad():
        out = model(**inputs)
    names = ("last_hidden_state", "logits", "encoder_last_hidden_state")
    return {n: getattr(out, n) for n in names if getattr(out, n, None) is not None}


def _performerize(arch, inputs, **kw):
    # calibration inputs for the probe (ViT has no dummy inputs), but identity adapters (no
    # shift, no balancing map, rho from the sequence): the logits are the model's own, exactly;
    # plain FAVOR++ unless exact terms are asked for
    return fh.performerize(
        arch.build(),
        kernel="oprf",
        plain=True,
        num_features=8,
        seed=0,
        calibration=[inputs],
        key_shift="none",
        balance=False,
        calibrate_rho=False,
        **kw,
    )


def _mixed_attention(module, query, key, value, attention_mask, **kwargs):
    """Softmax for self-attention, favor's plain FAVOR for the cross-attention modules."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if module.favor.cross_attention:
        return favor_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _use_mixed(model):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("favor_test_mixed", _mixed_attention)
    AttentionMaskInterface.register("favor_test_mixed", sdpa_mask)
    model.set_attn_implementation("favor_test_mixed")
    return model


@pytest.mark.parametrize("arch", SUPPORTED, ids=lambda a: a.name)
def test_window_covering_the_sequence_is_the_softmax_model(arch):
    inputs = _inputs(arch.kind)
    exact = _performerize(arch, inputs, exact_window=64)
    got = _outputs(exact, inputs)
    if arch.kind == "encoder-decoder":
        # the encoder is all self-attention: softmax exactly; the decoder's cross-attention has
        # no neighbours to make exact and runs plain FAVOR, so its reference is softmax
        # self-attention with favor's cross-attention
        torch.testing.assert_close(
            got["encoder_last_hidden_state"], _outputs(arch.build(), inputs)["encoder_last_hidden_state"], **TOL
        )
        ref = _outputs(_use_mixed(_performerize(arch, inputs, exact_window=64)), inputs)
    else:
        ref = _outputs(arch.build(), inputs)
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], **TOL)
    # the comparison has teeth: at M=8 plain FAVOR is far from softmax
    plain = _outputs(_performerize(arch, inputs), inputs)
    name = next(iter(ref))
    assert float((plain[name] - ref[name]).abs().max()) > 1e-4


@pytest.mark.parametrize("local", [False, True], ids=["favor", "local-terms"])
@pytest.mark.parametrize("arch", DECODERS, ids=lambda a: a.name)
def test_decoder_decodes_token_by_token_as_teacher_forcing(arch, local):
    inputs = _inputs(arch.kind)
    window = dict(exact_window=2, exact_sinks=1) if local else {}
    model = _performerize(arch, inputs, **window)
    ids = inputs["input_ids"][:1, :8]
    with torch.no_grad():
        full = model(input_ids=ids).logits
    torch.testing.assert_close(decoded_logits(model, ids, 4), full, **TOL)


@pytest.mark.parametrize("calibrated", [False, True], ids=["identity", "calibrated"])
@pytest.mark.parametrize("local", [False, True], ids=["favor", "local-terms"])
def test_encoder_decoder_decodes_token_by_token_as_teacher_forcing(local, calibrated):
    # cross-attention must use no statistic of the decoder's tokens (rho, a sequence key
    # shift): it would carry later tokens into earlier positions (0.01 off before cross.py)
    arch = by_name("BART")
    inputs = _inputs(arch.kind)
    window = dict(exact_window=2, exact_sinks=1) if local else {}
    if calibrated:
        model = fh.performerize(
            arch.build(), kernel="derf", num_features=8, calibration=[inputs], key_shift="sequence", **window
        )
    else:
        model = _performerize(arch, inputs, **window)
    src = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    dec = inputs["decoder_input_ids"]
    with torch.no_grad():
        full = model(**src, decoder_input_ids=dec).logits
        encoded = model.get_encoder()(**src)
        out = model(**src, encoder_outputs=encoded, decoder_input_ids=dec[:, :3], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for t in range(3, dec.shape[1]):
            out = model(
                **src,
                encoder_outputs=encoded,
                decoder_input_ids=dec[:, t : t + 1],
                past_key_values=cache,
                use_cache=True,
            )
            steps.append(out.logits)
            cache = out.past_key_values
    torch.testing.assert_close(torch.cat(steps, 1), full, **TOL)


@pytest.mark.parametrize("arch", REFUSED_ROWS, ids=lambda a: a.name)
def test_refused_at_performerize_with_the_feature_named(arch):
    inputs = _inputs(arch.kind)
    with pytest.raises(UnsupportedAttentionError, match=arch.refused) as info:
        fh.performerize(arch.build(), num_features=8, calibration=[inputs], exact_window=4)
    message = str(info.value)
    assert message.startswith(f"{arch.model} cannot be performerized: ")
    assert "FAVOR estimates softmax(scaling * q.k)" in message


def test_softcapping_model_is_refused_by_favor_not_by_sdpa():
    # Gemma-2 without sliding layers: soft-capping alone. Its softmax path refuses sdpa (the
    # calibration probe's reference); favor says what it cannot do before that
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        layer_types=["full_attention"] * 2,  # no sliding layers
    )
    inputs = _inputs("decoder")
    with pytest.raises(
        UnsupportedAttentionError, match=r"logit soft-capping \(config\.attn_logit_softcapping=50\.0\)"
    ) as info:
        fh.performerize(Gemma2ForCausalLM(cfg).double().eval(), calibration=[inputs])
    assert "eager" not in str(info.value)
    # loaded with attn_implementation="favor" and never performerized: refused at the first call
    model = Gemma2ForCausalLM(cfg).double().eval()
    model.set_attn_implementation(fh.NAME)
    with pytest.raises(
        UnsupportedAttentionError, match=r"Gemma2Attention uses logit soft-capping .* got softcap=50\.0"
    ):
        model(**inputs)


@pytest.mark.parametrize(
    "name,config,model_cls,match",
    [
        (
            "T5 encoder",
            dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
            "T5EncoderModel",
            r"T5Attention uses a relative position bias added to the logits .* got position_bias=a tensor",
        ),
        (
            "Mistral, sliding window",
            dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, sliding_window=16),
            "MistralForCausalLM",
            r"MistralAttention uses sliding-window attention .* got sliding_window=16",
        ),
    ],
)
def test_refused_at_the_first_call_when_never_performerized(name, config, model_cls, match):
    # the T5 issue: with the bias ignored, a window covering the sequence was 4 % off, silently
    import transformers

    cfg_cls = getattr(transformers, model_cls.replace("EncoderModel", "Config").replace("ForCausalLM", "Config"))
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(cfg_cls(vocab_size=VOCAB, **config)).double().eval()
    model.set_attn_implementation(fh.NAME)
    with pytest.raises(UnsupportedAttentionError, match=match):
        model(input_ids=torch.randint(3, VOCAB, (1, 6)))


def _bert_call():
    """One recorded attention call of a performerized tiny BERT: (module, q, k, v, mask, scaling)."""
    arch = by_name("BERT")
    inputs = _inputs(arch.kind)
    model = _performerize(arch, inputs)
    module, calls = next(iter(record_attention(model, [inputs]).items()))
    q, k, v, mask, scaling, *_ = calls[0]
    return module, q.double(), k.double(), v.double(), mask, scaling


def test_every_allowed_keyword_leaves_the_output_alone_and_unknown_ones_are_refused():
    module, q, k, v, mask, scaling = _bert_call()
    ref, _ = favor_attention_forward(module, q, k, v, mask, scaling=scaling)
    for name in PASSING:
        out, _ = favor_attention_forward(module, q, k, v, mask, scaling=scaling, **{name: torch.ones(1)})
        assert torch.equal(out, ref), name
    with pytest.raises(UnsupportedAttentionError, match=r"passes the keyword alibi_slopes=.* does not know"):
        favor_attention_forward(module, q, k, v, mask, scaling=scaling, alibi_slopes=torch.ones(4))


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_weight_changing_keywords_are_refused_unless_neutral(name):
    module, q, k, v, mask, scaling = _bert_call()
    feature = REFUSED[name][0]
    with pytest.raises(
        UnsupportedAttentionError, match=rf"BertSelfAttention uses {re.escape(feature[:20])}.* got {name}="
    ):
        favor_attention_forward(module, q, k, v, mask, scaling=scaling, **{name: torch.ones(1, 4, 1, 1)})
    ref, _ = favor_attention_forward(module, q, k, v, mask, scaling=scaling)
    out, _ = favor_attention_forward(module, q, k, v, mask, scaling=scaling, **{name: None})
    assert torch.equal(out, ref)
    if name == "position_bias":  # T5's cross-attention layers pass an all-zero bias
        out, _ = favor_attention_forward(module, q, k, v, mask, scaling=scaling, position_bias=torch.zeros(1, 4, 1, 1))
        assert torch.equal(out, ref)


def test_check_keywords_names_the_model_when_given():
    with pytest.raises(UnsupportedAttentionError, match=r"^T5Model \(Linear\) uses a relative position bias"):
        check_keywords(torch.nn.Linear(1, 1), {"position_bias": torch.ones(1)}, model="T5Model")


def test_cross_attention_with_local_terms_is_plain_favor_and_saved(tmp_path):
    # it used to crash: "The expanded size of the tensor (10) must match ... (24)"
    arch = by_name("BART")
    inputs = _inputs(arch.kind)
    local = _performerize(arch, inputs, exact_window=2, exact_sinks=1)
    plain = _performerize(arch, inputs)
    cross = local.config.favor_performer["cross_attention"]
    assert cross == [f"model.decoder.layers.{i}.encoder_attn" for i in range(2)]
    for name in cross:
        a, b = local.get_submodule(name), plain.get_submodule(name)
        assert a.favor.cross_attention and a.favor.local
        calls = record_attention(local, [inputs])[a]
        q, k, v, mask, scaling, *_ = calls[0]
        assert q.shape[-2] != k.shape[-2]
        for lq in (q.shape[-2], k.shape[-2]):  # also as many queries as keys: still no diagonal
            qq = q.double()[..., :lq, :] if lq <= q.shape[-2] else torch.cat([q, q], -2).double()[..., :lq, :]
            m = None if mask is None else mask[..., :1, :].expand(-1, -1, lq, -1)
            got, _ = favor_attention_forward(a, qq, k.double(), v.double(), m, scaling=scaling)
            ref, _ = favor_attention_forward(b, qq, k.double(), v.double(), m, scaling=scaling)
            assert torch.equal(got, ref)
    fh.save_pretrained(local, tmp_path / "bart")
    loaded = fh.from_pretrained(tmp_path / "bart")
    assert [
        n for n, m in loaded.named_modules() if getattr(getattr(m, "favor", None), "cross_attention", False)
    ] == cross
    torch.testing.assert_close(_outputs(loaded, inputs)["logits"], _outputs(local, inputs)["logits"], rtol=0, atol=0)


def test_local_terms_refuse_an_unmarked_cross_attention_call():
    module, q, k, v, mask, scaling = _bert_call()
    arch = by_name("BERT")
    inputs = _inputs(arch.kind)
    model = _performerize(arch, inputs, exact_window=2)
    module = next(m for m in model.modules() if hasattr(m, "favor"))
    with pytest.raises(ValueError, match=r"10 queries and 7 keys without a causal mask \(cross-attention\?\)"):
        favor_attention_forward(module, q, k[..., :7, :], v[..., :7, :], None, scaling=scaling)


def test_readme_carries_this_table():
    readme = (Path(__file__).parents[2] / "docs" / "hf.md").read_text()
    assert table() in readme, "docs/hf.md's architecture table is stale: paste `python -m tests.hf.architectures`"
    assert CHECK in readme


def test_packed_sequences_are_refused_at_the_call():
    # position ids that restart make transformers build a block-diagonal mask (no cache):
    # two sequences in one row, which FAVOR's running sums would mix
    arch = by_name("Llama")
    model = _performerize(arch, _inputs(arch.kind))
    ids = torch.randint(3, VOCAB, (1, 10))
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]])
    with pytest.raises(UnsupportedAttentionError, match="packed sequences"), torch.no_grad():
        model(input_ids=ids, position_ids=positions, use_cache=False)


@pytest.mark.parametrize(
    "config_cls,model_cls,config,found",
    [
        (
            "BertConfig",
            "BertLMHeadModel",
            dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, is_decoder=True),
            "bert.encoder.layer.{}.crossattention.self",
        ),
        ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=2, n_head=4), "transformer.h.{}.crossattention"),
    ],
)
def test_cross_attention_is_found_by_its_arguments_or_its_flag(config_cls, model_cls, config, found):
    # BERT's cross-attention module is called with encoder_hidden_states; GPT-2's says
    # is_cross_attention. Local terms there would pair decoder token i with encoder state i
    import transformers

    torch.manual_seed(0)
    cfg = getattr(transformers, config_cls)(vocab_size=VOCAB, add_cross_attention=True, **config)
    model = getattr(transformers, model_cls)(cfg).double().eval()
    g = torch.Generator().manual_seed(1)
    batch = {
        "input_ids": torch.randint(3, VOCAB, (2, 6), generator=g),
        "encoder_hidden_states": torch.randn(2, 6, 32, generator=g, dtype=torch.float64),  # as long as the queries
    }
    model = fh.performerize(model, num_features=8, calibration=[batch], exact_window=2)
    assert model.config.favor_performer["cross_attention"] == [found.format(i) for i in range(2)]
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=lambda a: a.name)
def test_each_architecture_is_called_by_its_main_input(arch):
    # a vision model takes pixel_values, not the token ids a text model takes
    assert arch.build().main_input_name in _inputs(arch.kind)


def test_vit_performerized_without_calibration_runs_on_pixel_values():
    # the probe used to feed ViT token ids: AttributeError 'NoneType' object has no attribute 'dtype'
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16, patch_size=4
    )
    model = fh.performerize(ViTModel(config).eval())
    assert len(model.config.favor_performer["modules"]) == 2
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(pixel_values=images).last_hidden_state
    assert out.shape == (2, 17, 32) and torch.isfinite(out).all()


def test_a_main_input_the_probe_cannot_make_asks_for_calibration():
    model = by_name("BERT").build()
    model.main_input_name = "input_features"  # as Whisper's
    with pytest.raises(ValueError, match=r"BertModel takes 'input_features' .* pass calibration=\[\{'input_features'"):
        fh.performerize(model)
