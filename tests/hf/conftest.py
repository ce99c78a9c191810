import pytest
import torch

transformers = pytest.importorskip("transformers")


def _tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        # larger than BERT's 0.02 so that attention is not uniform: scaled mean |q|^2 ~ 2,
        # where FAVOR's error at M=8192 is ~0.01 (0.3 gives |q|^2 ~ 19: hopeless for any M)
        initializer_range=0.1,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertModel(cfg).double().eval()


def _tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    cfg = LlamaConfig(
        vocab_size=64,
        intermediate_size=64,
        # grouped-query attention by default: k/v heads are repeated
        **{**shape, **overrides},
        max_position_embeddings=64,
        initializer_range=0.1,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).double().eval()


@pytest.fixture
def tiny_bert():
    return _tiny_bert


@pytest.fixture
def tiny_llama():
    return _tiny_llama
