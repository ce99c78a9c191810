"""Checkpoints: exact round trip, atomic layout, clear errors for broken files."""

import json

import pytest
import torch

from favor.models import PerformerConfig, PerformerLM
from favor.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model_state,
    optimizer_from_tensors,
    save_checkpoint,
)

CFG = PerformerConfig(vocab_size=28, dim=16, depth=2, heads=2)


def _trained():
    model = PerformerLM(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 28, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        opt.zero_grad()
        model(x).logsumexp(-1).mean().backward()
        opt.step()
    return model, opt, x


def test_save_load_model_and_optimizer_exactly(tmp_path):
    model, opt, x = _trained()
    save_checkpoint(tmp_path, step=3, model=model, config={"model": CFG.to_dict()}, optimizer=opt)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.step == 3 and ckpt.config["model"] == CFG.to_dict()
    fresh = PerformerLM(CFG.replace(seed=9))  # different projections and weights
    load_model_state(fresh, ckpt)
    assert torch.equal(fresh(x), model(x))
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    opt2.load_state_dict(optimizer_from_tensors(ckpt.optimizer_tensors(), ckpt.trainer["optimizer"]))
    sd1, sd2 = opt.state_dict(), opt2.state_dict()
    assert sd1["param_groups"] == sd2["param_groups"] and sd1["state"].keys() == sd2["state"].keys()
    for pid, s1 in sd1["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1[key], sd2["state"][pid][key])


def test_layout_latest_pointer_and_pruning(tmp_path):
    model, opt, _ = _trained()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step=step, model=model, config={}, optimizer=opt, keep=2)
    root = tmp_path / "checkpoints"
    assert (root / "LATEST").read_text().strip() == "step_00000003"
    assert sorted(p.name for p in root.iterdir()) == ["LATEST", "step_00000002", "step_00000003"]
    assert load_checkpoint(root / "step_00000002").step == 2
    # no pickle anywhere: the tensors are safetensors, the rest JSON
    files = {p.name for p in (root / "step_00000003").iterdir()}
    assert files == {"model.safetensors", "optimizer.safetensors", "config.json", "trainer.json"}


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="LATEST is missing"):
        load_checkpoint(tmp_path)
    model, _, _ = _trained()
    path = save_checkpoint(tmp_path, step=1, model=model, config={})
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors is missing"):
        load_checkpoint(tmp_path).model_state()


def test_truncated_checkpoint_names_the_file(tmp_path):
    model, _, _ = _trained()
    path = save_checkpoint(tmp_path, step=1, model=model, config={})
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated"):
        load_checkpoint(tmp_path).model_state()
    (path / "trainer.json").write_text('{"format": ')
    with pytest.raises(CheckpointError, match=r"trainer\.json is not valid JSON"):
        load_checkpoint(tmp_path)


def test_incompatible_model_names_the_file(tmp_path):
    model, _, _ = _trained()
    save_checkpoint(tmp_path, step=1, model=model, config={})
    bigger = PerformerLM(CFG.replace(dim=32))
    with pytest.raises(CheckpointError, match=r"model\.safetensors does not fit the model"):
        load_model_state(bigger, load_checkpoint(tmp_path))


def test_wrong_format_is_refused(tmp_path):
    model, _, _ = _trained()
    path = save_checkpoint(tmp_path, step=1, model=model, config={})
    meta = json.loads((path / "trainer.json").read_text())
    meta["format"] = "something-else"
    (path / "trainer.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="expected 'favor-checkpoint-1'"):
        load_checkpoint(tmp_path)


def test_resaving_the_latest_step_replaces_it(tmp_path):
    # a fresh run in an older run's directory saves the step LATEST names again
    model, opt, _ = _trained()
    save_checkpoint(tmp_path, step=3, model=model, config={"run": 1}, optimizer=opt)
    save_checkpoint(tmp_path, step=3, model=model, config={"run": 2}, optimizer=opt)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.step == 3 and ckpt.config == {"run": 2}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["LATEST", "step_00000003"]


def test_latest_cannot_point_outside_the_run(tmp_path):
    model, _, _ = _trained()
    save_checkpoint(tmp_path, step=1, model=model, config={})
    (tmp_path / "checkpoints" / "LATEST").write_text("../../etc\n")
    with pytest.raises(CheckpointError, match=r"LATEST names '\.\./\.\./etc', expected a checkpoint name"):
        load_checkpoint(tmp_path)
