"""The architectures favor.hf is checked on: tiny random-weight configs, each supported or
refused with a message (tests/hf/test_architectures.py asserts every row).

    python -m tests.hf.architectures     # prints docs/hf.md's table from these rows

Supported means: performerize with an exact window covering the whole sequence gives the
softmax model's outputs (float64, 1e-10), and, for decoders, token-by-token decoding with
the cache gives the teacher-forced logits (1e-10), with plain FAVOR and with exact local terms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

#: sizes shared by every tiny config: random weights, float64, attention far from uniform
VOCAB, HIDDEN, LAYERS, HEADS, FFN = 64, 32, 2, 4, 64
#: larger than the usual 0.02 so that attention is not uniform and FAVOR alone is visibly off
INIT = 0.1


@dataclass(frozen=True)
class Arch:
    """One row: ``build()`` a float64 model in eval mode; ``kind`` encoder, decoder,
    encoder-decoder or vision encoder; ``refused`` a regex the refusal must match (None:
    supported); ``why`` one line for docs/hf.md."""

    name: str
    model: str
    kind: str
    build: Callable[[], torch.nn.Module] = field(repr=False)
    why: str
    refused: str | None = None

    @property
    def status(self) -> str:
        return "supported" if self.refused is None else "refused"


def _make(config_cls: str, model_cls: str, **kwargs) -> Callable[[], torch.nn.Module]:
    def build():
        import transformers

        torch.manual_seed(0)
        config = getattr(transformers, config_cls)(**kwargs)
        return getattr(transformers, model_cls)(config).double().eval()

    return build


_SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    intermediate_size=FFN,
    max_position_embeddings=64,
    initializer_range=INIT,
)
_NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
_DECODER = dict(_SMALL, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_ENC_DEC = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)

ARCHITECTURES: tuple[Arch, ...] = (
    Arch(
        "BERT",
        "BertModel",
        "encoder",
        _make("BertConfig", "BertModel", **_SMALL, **_NO_DROPOUT),
        "bidirectional, key-padding mask",
    ),
    Arch(
        "RoBERTa",
        "RobertaModel",
        "encoder",
        _make("RobertaConfig", "RobertaModel", **_SMALL, **_NO_DROPOUT, pad_token_id=1),
        "bidirectional, key-padding mask",
    ),
    Arch(
        "DistilBERT",
        "DistilBertModel",
        "encoder",
        _make(
            "DistilBertConfig",
            "DistilBertModel",
            vocab_size=VOCAB,
            dim=HIDDEN,
            n_layers=LAYERS,
            n_heads=HEADS,
            hidden_dim=FFN,
            max_position_embeddings=64,
            initializer_range=INIT,
            dropout=0.0,
            attention_dropout=0.0,
        ),
        "bidirectional, key-padding mask",
    ),
    Arch(
        "ALBERT",
        "AlbertModel",
        "encoder",
        _make("AlbertConfig", "AlbertModel", **_SMALL, **_NO_DROPOUT, embedding_size=16),
        "bidirectional; the layer shared by every depth gets one adapter",
    ),
    Arch(
        "ELECTRA",
        "ElectraModel",
        "encoder",
        _make("ElectraConfig", "ElectraModel", **_SMALL, **_NO_DROPOUT, embedding_size=16),
        "bidirectional, key-padding mask",
    ),
    Arch(
        "ViT",
        "ViTModel",
        "vision encoder",
        _make(
            "ViTConfig",
            "ViTModel",
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            intermediate_size=FFN,
            image_size=16,
            patch_size=4,
            initializer_range=INIT,
            **_NO_DROPOUT,
        ),
        "bidirectional over 16 patches + [CLS]",
    ),
    Arch(
        "Llama",
        "LlamaForCausalLM",
        "decoder",
        _make("LlamaConfig", "LlamaForCausalLM", **_DECODER),
        "causal, grouped-query heads, rotary",
    ),
    Arch(
        "GPT-2",
        "GPT2LMHeadModel",
        "decoder",
        _make(
            "GPT2Config",
            "GPT2LMHeadModel",
            vocab_size=VOCAB,
            n_embd=HIDDEN,
            n_layer=LAYERS,
            n_head=HEADS,
            n_positions=64,
            initializer_range=INIT,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "causal, learned positions",
    ),
    Arch(
        "GPT-NeoX",
        "GPTNeoXForCausalLM",
        "decoder",
        _make(
            "GPTNeoXConfig", "GPTNeoXForCausalLM", **{k: v for k, v in _DECODER.items() if k != "num_key_value_heads"}
        ),
        "causal, partial rotary",
    ),
    Arch(
        "Qwen2",
        "Qwen2ForCausalLM",
        "decoder",
        _make("Qwen2Config", "Qwen2ForCausalLM", **_DECODER),
        "causal, grouped-query heads, q/k/v biases",
    ),
    Arch(
        "Mistral",
        "MistralForCausalLM",
        "decoder",
        _make("MistralConfig", "MistralForCausalLM", **_DECODER, sliding_window=None),
        "causal, grouped-query heads (sliding_window=None, as Mistral 7B v0.2+)",
    ),
    Arch(
        "Phi",
        "PhiForCausalLM",
        "decoder",
        _make(
            "PhiConfig",
            "PhiForCausalLM",
            **{k: v for k, v in _DECODER.items() if k != "num_key_value_heads"},
            resid_pdrop=0.0,
            embd_pdrop=0.0,
        ),
        "causal, partial rotary",
    ),
    Arch(
        "OPT",
        "OPTForCausalLM",
        "decoder",
        _make(
            "OPTConfig",
            "OPTForCausalLM",
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            ffn_dim=FFN,
            max_position_embeddings=64,
            word_embed_proj_dim=HIDDEN,
            init_std=INIT,
            dropout=0.0,
            attention_dropout=0.0,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "causal, queries pre-scaled (scaling=1)",
    ),
    Arch(
        "Gemma",
        "GemmaForCausalLM",
        "decoder",
        _make("GemmaConfig", "GemmaForCausalLM", **_DECODER, head_dim=8),
        "causal, grouped-query heads",
    ),
    Arch(
        "BART",
        "BartForConditionalGeneration",
        "encoder-decoder",
        _make(
            "BartConfig",
            "BartForConditionalGeneration",
            **_ENC_DEC,
            d_model=HIDDEN,
            encoder_layers=LAYERS,
            decoder_layers=LAYERS,
            encoder_attention_heads=HEADS,
            decoder_attention_heads=HEADS,
            encoder_ffn_dim=FFN,
            decoder_ffn_dim=FFN,
            max_position_embeddings=64,
            init_std=INIT,
            dropout=0.0,
            attention_dropout=0.0,
        ),
        "encoder and causal decoder; cross-attention takes plain FAVOR (no diagonal for local terms)",
    ),
    Arch(
        "Mistral, sliding window",
        "MistralForCausalLM",
        "decoder",
        _make("MistralConfig", "MistralForCausalLM", **_DECODER, sliding_window=16),
        "sliding-window attention (config.sliding_window): favor.hf has no windowed FAVOR",
        refused=r"sliding-window attention \(config\.sliding_window=16; .*sliding_window=None",
    ),
    Arch(
        "Gemma-2",
        "Gemma2ForCausalLM",
        "decoder",
        _make("Gemma2Config", "Gemma2ForCausalLM", **_DECODER, head_dim=8),
        "logit soft-capping and sliding-window layers",
        refused=r"sliding-window / chunked attention .*logit soft-capping \(config\.attn_logit_softcapping=50\.0\)",
    ),
    Arch(
        "GPT-OSS",
        "GptOssForCausalLM",
        "decoder",
        _make(
            "GptOssConfig",
            "GptOssForCausalLM",
            **_DECODER,
            head_dim=8,
            num_local_experts=2,
            num_experts_per_tok=1,
            layer_types=["full_attention"] * LAYERS,  # no sliding layers: the sinks alone are refused
        ),
        "learned attention sinks (s_aux: an extra logit per head), found while performerize runs it",
        refused=r"GptOssAttention uses learned attention sinks \(s_aux: .*got s_aux=a tensor of shape \(4,\)",
    ),
    Arch(
        "Falcon (ALiBi)",
        "FalconForCausalLM",
        "decoder",
        _make(
            "FalconConfig",
            "FalconForCausalLM",
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            alibi=True,
        ),
        "ALiBi biases; attention hard-coded, not dispatched through AttentionInterface",
        refused=r"FalconForCausalLM cannot be performerized: its attention uses ALiBi position biases \(config\.alibi\)",
    ),
    Arch(
        "ModernBERT",
        "ModernBertModel",
        "encoder",
        _make(
            "ModernBertConfig",
            "ModernBertModel",
            **{k: v for k, v in _SMALL.items() if k != "initializer_range"},
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            cls_token_id=1,
            sep_token_id=2,
        ),
        "local (sliding-window) attention in 2 of every 3 layers",
        refused=r"sliding-window / chunked attention \(config\.layer_types has \['sliding_attention'\]; "
        r"config\.local_attention=128\)",
    ),
    Arch(
        "T5 encoder",
        "T5EncoderModel",
        "encoder",
        _make(
            "T5Config",
            "T5EncoderModel",
            **_ENC_DEC,
            d_model=HIDDEN,
            d_kv=8,
            d_ff=FFN,
            num_layers=LAYERS,
            num_heads=HEADS,
        ),
        "relative position bias added to the logits",
        refused=r"relative position bias added to the logits \(config\.relative_attention_num_buckets=32, T5-style\)",
    ),
    Arch(
        "T5",
        "T5ForConditionalGeneration",
        "encoder-decoder",
        _make(
            "T5Config",
            "T5ForConditionalGeneration",
            **_ENC_DEC,
            d_model=HIDDEN,
            d_kv=8,
            d_ff=FFN,
            num_layers=LAYERS,
            num_heads=HEADS,
            dropout_rate=0.0,
        ),
        "relative position bias added to the logits",
        refused=r"relative position bias added to the logits \(config\.relative_attention_num_buckets=32, T5-style\)",
    ),
)


def by_name(name: str) -> Arch:
    for arch in ARCHITECTURES:
        if arch.name == name:
            return arch
    raise KeyError(name)


#: the command that checks every row
CHECK = "python -m pytest -q tests/hf/test_architectures.py"


def table() -> str:
    """docs/hf.md's table (markdown), one row per architecture."""
    rows = ["| architecture | transformers class | kind | status | why |", "|---|---|---|---|---|"]
    for a in ARCHITECTURES:
        rows.append(f"| {a.name} | `{a.model}` | {a.kind} | {a.status} | {a.why} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())  # noqa: T201 (a script: the table goes to stdout)
