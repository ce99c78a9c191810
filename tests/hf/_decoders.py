"""Tiny random-weight decoders of eight families (vocab 64, float64, eval mode) for the
generation tests: grouped-query attention (Llama, Qwen2, Mistral, Gemma), learned positions
(GPT-2, OPT), partial rotary embeddings (GPT-NeoX, Phi)."""

import torch

VOCAB = 64


def _common(**extra):
    return dict(
        vocab_size=VOCAB,
        max_position_embeddings=128,
        initializer_range=0.1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **extra,
    )


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM, LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        **_common(),
    )


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_positions=128,
        n_embd=32,
        n_layer=2,
        n_head=4,
        initializer_range=0.1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel, cfg


def _neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM, GPTNeoXConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        rotary_pct=0.5,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        **_common(),
    )


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM, Qwen2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=False,
        **_common(),
    )


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM, MistralConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=None,
        **_common(),
    )


def _phi():
    from transformers import PhiConfig, PhiForCausalLM

    return PhiForCausalLM, PhiConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        partial_rotary_factor=0.5,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attention_dropout=0.0,
        **_common(),
    )


def _opt():
    from transformers import OPTConfig, OPTForCausalLM

    return OPTForCausalLM, OPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        init_std=0.1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        dropout=0.0,
        attention_dropout=0.0,
        word_embed_proj_dim=32,
    )


def _gemma():
    from transformers import GemmaConfig, GemmaForCausalLM

    return GemmaForCausalLM, GemmaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=8,
        **_common(),
    )


FAMILIES = {
    "llama": _llama,
    "gpt2": _gpt2,
    "gpt_neox": _neox,
    "qwen2": _qwen2,
    "mistral": _mistral,
    "phi": _phi,
    "opt": _opt,
    "gemma": _gemma,
}


def tiny_decoder(family: str, seed: int = 0):
    """A fresh softmax (sdpa) model of ``family``, float64, eval mode."""
    cls, cfg = FAMILIES[family]()
    torch.manual_seed(seed)
    return cls(cfg).double().eval()
