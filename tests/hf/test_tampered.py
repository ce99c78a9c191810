"""favor.hf.from_pretrained on a tampered or mismatched directory: a ValueError naming the
file and what was expected, and no code executed (a pickle in place of a safetensors file,
or beside it as pytorch_model.bin, would create a marker file if it were ever unpickled)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import favor.hf as fh
from tests.faults._pickles import check_payload_runs, raw_pickle, torch_save


def _edit(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _performer(key, value):
    return lambda d, m: _edit(d / "favor.json", lambda j: j["performer"].__setitem__(key, value))


def _drop_weight(d: Path, m: Path) -> None:
    tensors = load_file(d / "model.safetensors")
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


def _shrink_projection(d: Path, m: Path) -> None:
    tensors = load_file(d / "favor.safetensors")
    key = next(k for k in tensors if k.endswith("projection"))
    tensors[key] = tensors[key][:-1].contiguous()
    save_file(tensors, d / "favor.safetensors", metadata={"format": "pt"})


def _bin_instead(d: Path, m: Path) -> None:
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(torch_save(m))


#: name -> (tamper(directory, marker), regex the ValueError must match)
CASES = {
    "favor_json_not_json": (lambda d, m: (d / "favor.json").write_text("{"), r"favor\.json is not valid JSON"),
    "favor_json_not_a_model_class": (
        lambda d, m: _edit(d / "favor.json", lambda j: j.__setitem__("model_class", "pipeline")),
        r"favor\.json: model_class 'pipeline' is not a transformers model class",
    ),
    "favor_json_auto_class": (
        lambda d, m: _edit(d / "favor.json", lambda j: j.__setitem__("model_class", "AutoModel")),
        r"favor\.json: model_class 'AutoModel' is not a transformers model class",
    ),
    "favor_json_no_modules": (_performer("modules", "all"), r"favor\.json: 'performer' should be an object whose"),
    "favor_json_bad_kernel": (_performer("kernel", "nope"), r"favor\.json: bad performer config: kernel must be"),
    "favor_json_num_features_edited": (
        _performer("num_features", 32),
        r"favor\.safetensors does not match .*favor\.json: shape mismatches \['.*projection: file \(16, 16\) vs model \(32, 16\)",
    ),
    "favor_json_unknown_module": (
        _performer("modules", ["encoder.layer.7.attention.self"]),
        r"favor\.safetensors has no \(heads, head dim\) key_shift for attention module 'encoder\.layer\.7",
    ),
    "favor_weights_wrong_shape": (_shrink_projection, r"favor\.safetensors does not match .*shape mismatches"),
    "favor_weights_are_a_pickle": (
        lambda d, m: (d / "favor.safetensors").write_bytes(raw_pickle(m)),
        r"favor\.safetensors is not a valid safetensors file",
    ),
    "model_weights_are_a_pickle": (
        lambda d, m: (d / "model.safetensors").write_bytes(raw_pickle(m)),
        r"model\.safetensors is not a valid safetensors file",
    ),
    "model_weights_are_torch_save": (
        lambda d, m: (d / "model.safetensors").write_bytes(torch_save(m)),
        r"model\.safetensors is not a valid safetensors file",
    ),
    "pytorch_model_bin_instead": (
        _bin_instead,
        r"cannot load the transformers weights \(model\.safetensors\).*never loads pickle files; found \['pytorch_model\.bin'\]",
    ),
    "config_json_sizes_edited": (
        lambda d, m: _edit(d / "config.json", lambda j: j.update(hidden_size=64, intermediate_size=128)),
        r"cannot load the transformers weights.*config\.json do not match the weights",
    ),
    "model_weight_missing": (_drop_weight, r"model\.safetensors does not match .*config\.json: \{'missing_keys'"),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from tests.hf.conftest import _tiny_bert

    path = tmp_path_factory.mktemp("hf") / "good"
    model = fh.performerize(_tiny_bert(), kernel="oprf", plain=True, num_features=16, seed=0)
    fh.save_pretrained(model, path)
    return path


def test_untampered_directory_loads(saved):
    model = fh.from_pretrained(saved)
    assert model.config.favor_performer["num_features"] == 16


def test_forced_options_are_refused(saved):
    with pytest.raises(TypeError, match="use_safetensors"):
        fh.from_pretrained(saved, use_safetensors=False)


@pytest.mark.parametrize("case", sorted(CASES))
def test_tampered_directory_is_refused_without_running_code(saved, tmp_path, case):
    check_payload_runs(tmp_path)
    directory = tmp_path / "m"
    shutil.copytree(saved, directory)
    marker = tmp_path / "pickle-ran"
    tamper, pattern = CASES[case]
    tamper(directory, marker)
    with pytest.raises(ValueError) as info:
        fh.from_pretrained(directory)
    assert re.search(pattern, str(info.value), flags=re.S), str(info.value)
    assert str(directory) in str(info.value)
    assert not marker.exists(), "a pickle was executed"
