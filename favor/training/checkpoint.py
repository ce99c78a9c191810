"""Checkpoints without pickle: safetensors for tensors, JSON for everything else.

Layout of a run directory::

    DIR/checkpoints/LATEST                 name of the newest complete checkpoint
    DIR/checkpoints/step_00000020/
        model.safetensors                  model weights (projections included: buffers)
        optimizer.safetensors              optimiser tensors + torch RNG state
        config.json                        model and training configs
        trainer.json                       step, scalars, optimiser hyper-parameters, file sizes

Writes are atomic: a checkpoint is assembled in a hidden temporary directory
(``.step_N.tmp-PID``), every file is fsynced, the directory is renamed into place, and only
then is LATEST replaced (temp file, fsync, rename). A crash at any point leaves LATEST
naming a complete checkpoint, and every visible ``step_*`` directory complete: old ones are
renamed to a hidden name before they are deleted. Hidden leftovers of a killed writer are
never read and are removed by the next save (one writer per run directory). A write that
fails (disk full, I/O error) raises CheckpointWriteError, removes what it wrote, and leaves
the previous checkpoint intact and still LATEST (tests/faults/).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

__all__ = [
    "CheckpointError",
    "CheckpointWriteError",
    "has_checkpoint",
    "Checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "resolve_checkpoint",
    "optimizer_to_tensors",
    "optimizer_from_tensors",
    "atomic_write_text",
    "load_model_state",
    "FORMAT",
]

FORMAT = "favor-checkpoint-1"
MODEL_FILE, OPTIM_FILE, CONFIG_FILE, TRAINER_FILE, LATEST = (
    "model.safetensors",
    "optimizer.safetensors",
    "config.json",
    "trainer.json",
    "LATEST",
)


log = logging.getLogger(__name__)
#: markers of the hidden entries a writer makes: temp dirs/files, dirs being replaced or deleted
_HIDDEN_TAGS = (".tmp-", ".old-", ".del-")
_STEP_NAME = re.compile(r"step_\d{8,}")


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, or does not fit; the message names the file."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (disk full, I/O error). ``errno`` is the cause's; the
    message names the checkpoint and what LATEST still names."""


@dataclass
class Checkpoint:
    path: Path
    config: dict[str, Any]
    trainer: dict[str, Any]

    def model_state(self) -> dict[str, torch.Tensor]:
        return _load_tensors(self.path / MODEL_FILE, self.trainer)

    def optimizer_tensors(self) -> dict[str, torch.Tensor]:
        return _load_tensors(self.path / OPTIM_FILE, self.trainer)

    @property
    def step(self) -> int:
        return int(self.trainer["step"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _write_text(path: Path, text: str) -> None:
    """Write and fsync a small text file."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same directory, fsync, rename.
    On failure the temp file is removed and ``path`` is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        _write_text(tmp, text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _remove(path: Path) -> None:
    """Delete a directory so that it is never seen half-deleted: rename it to a hidden
    name first (one atomic step), then remove that. Best effort: failures are logged."""
    if not path.exists():
        return
    hidden = path
    if not path.name.startswith("."):
        hidden = path.with_name(f".{path.name}.del-{os.getpid()}")
        try:
            os.replace(path, hidden)
        except OSError as e:
            log.warning("could not remove %s: %s", path, e)
            return
    if hidden.is_dir():
        shutil.rmtree(hidden, ignore_errors=True)
    else:
        hidden.unlink(missing_ok=True)


def _clean_leftovers(root: Path) -> None:
    """Remove hidden temp/old/deleted entries a killed writer left in ``root``."""
    for p in root.iterdir():
        if p.name.startswith(".") and any(tag in p.name for tag in _HIDDEN_TAGS):
            _remove(p)


def _latest_name(root: Path) -> str | None:
    latest = root / LATEST
    try:
        return latest.read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` (a run directory) has a LATEST checkpoint to resume from."""
    return (Path(run_dir) / "checkpoints" / LATEST).is_file()


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and JSON values."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"state.{pid}.{key}"] = val.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(pid), {})[key] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of optimizer_to_tensors: a state dict for ``optimizer.load_state_dict``."""
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        if not name.startswith("state."):
            continue
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = t
    for pid, vals in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(vals)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    run_dir: str | Path,
    *,
    step: int,
    model: torch.nn.Module,
    config: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    extra: dict[str, Any] | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step`` under ``run_dir/checkpoints`` atomically; keep the newest
    ``keep``. ``extra`` is JSON data stored in trainer.json (data position, metrics...);
    ``extra_tensors`` go to optimizer.safetensors beside the optimiser state and RNG.

    Raises CheckpointWriteError (an OSError) if the disk is full or a write fails: what
    this call wrote is removed and LATEST still names the previous checkpoint."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    previous = _latest_name(root)
    _clean_leftovers(root)
    model_tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    opt_meta: dict[str, Any] = {}
    opt_tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    if optimizer is not None:
        t, opt_meta = optimizer_to_tensors(optimizer)
        opt_tensors.update(t)
    for key, val in (extra_tensors or {}).items():
        if key in opt_tensors:
            raise ValueError(f"extra_tensors key {key!r} collides with the optimiser state")
        opt_tensors[key] = val.detach().contiguous().cpu()
    tmp = root / f".{name}.tmp-{os.getpid()}"
    final = root / name
    renamed = False
    try:
        tmp.mkdir()
        save_file(model_tensors, str(tmp / MODEL_FILE), metadata={"format": FORMAT})
        save_file(opt_tensors, str(tmp / OPTIM_FILE), metadata={"format": FORMAT})
        _write_text(tmp / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True) + "\n")
        trainer = {
            "format": FORMAT,
            "step": int(step),
            "optimizer": opt_meta,
            "extra": extra or {},
            "files": {f: (tmp / f).stat().st_size for f in (MODEL_FILE, OPTIM_FILE, CONFIG_FILE)},
        }
        _write_text(tmp / TRAINER_FILE, json.dumps(trainer, indent=2, sort_keys=True) + "\n")
        for f in (MODEL_FILE, OPTIM_FILE):
            _fsync_file(tmp / f)
        _fsync_dir(tmp)
        if final.exists():  # complete, but LATEST never named it (its writer was killed first) ...
            if previous == name:  # ... or a fresh run replaces an older run's checkpoint of this step:
                # LATEST goes first, so that it never names a directory while it is swapped
                (root / LATEST).unlink()
                _fsync_dir(root)
            _remove(final)
        os.replace(tmp, final)
        renamed = True
        _fsync_dir(root)
        atomic_write_text(root / LATEST, name + "\n")
    except OSError as e:
        _remove(tmp)
        now = _latest_name(root)
        if renamed and now == name:  # LATEST was replaced, but syncing failed afterwards
            still = f"LATEST names {name}, but it may not be on disk"
        else:
            if renamed:  # LATEST never named the new directory: remove it
                _remove(final)
            if now is None and previous is not None:
                still = f"LATEST (which named {previous}, being replaced) was removed: start the run afresh"
            elif previous is not None:
                still = f"LATEST still names {previous}, which is intact"
            else:
                still = "no checkpoint was written yet"
        why = e.strerror or str(e)
        if getattr(e, "filename", None):
            why += f" (writing {e.filename})"
        if e.errno == errno.ENOSPC:
            why += "; the disk is full: free space, then resume"
        raise CheckpointWriteError(e.errno, f"could not write checkpoint {final}: {why}; {still}") from e
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for p in done[: max(0, len(done) - keep)]:
        if p.name != name:
            _remove(p)
    return final


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a run dir, its checkpoints/ dir, or a step dir."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if (path / TRAINER_FILE).is_file() or (path / MODEL_FILE).is_file():
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    latest = root / LATEST
    if not latest.is_file():
        raise CheckpointError(f"no checkpoint under {path}: {latest} is missing (was the run checkpointed yet?)")
    name = latest.read_text(encoding="utf-8").strip()
    if not _STEP_NAME.fullmatch(name):  # never follow a path out of the run (LATEST edited)
        raise CheckpointError(f"{latest} names {name!r}, expected a checkpoint name like step_00000001")
    step_dir = root / name
    if not step_dir.is_dir():
        raise CheckpointError(f"{latest} names checkpoint {name!r}, but {step_dir} does not exist")
    return step_dir


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint file {path} is not valid JSON (truncated?): {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint file {path} should hold a JSON object, got {type(data).__name__}")
    return data


def _load_tensors(path: Path, trainer: dict[str, Any]) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    want = trainer.get("files", {}).get(path.name)
    got = path.stat().st_size
    if want is not None and got != want:
        raise CheckpointError(f"checkpoint file {path} is truncated or altered: {got} bytes, trainer.json says {want}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {path} cannot be read as safetensors: {e}") from None


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Open a checkpoint (run dir, checkpoints dir or step dir); tensors load lazily."""
    step_dir = resolve_checkpoint(path)
    trainer_path = step_dir / TRAINER_FILE
    trainer = _read_json(trainer_path)
    if trainer.get("format") != FORMAT:
        raise CheckpointError(f"{trainer_path} has format {trainer.get('format')!r}, expected {FORMAT!r}")
    if "step" not in trainer:
        raise CheckpointError(f"{trainer_path} lacks the 'step' entry")
    config = _read_json(step_dir / CONFIG_FILE)
    return Checkpoint(step_dir, config, trainer)


def load_model_state(model: torch.nn.Module, ckpt: Checkpoint) -> None:
    """Load weights into ``model`` exactly; a mismatch raises CheckpointError naming the file."""
    state = ckpt.model_state()
    path = ckpt.path / MODEL_FILE
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"checkpoint file {path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatches {shapes[:5]}"
        )
    model.load_state_dict(state, strict=True)
