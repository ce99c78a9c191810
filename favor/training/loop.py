"""Training a Performer LM on proteins: deterministic, resumable, logged.

Everything a step does is a function of (config, step): the batch is drawn from a
generator seeded by (seed, step), the feature redraws by (seed, layer, step), the learning
rate by the step. A checkpoint therefore needs only weights, optimiser tensors, the torch
RNG state (for dropout) and the step, and ``resume=True`` continues bit-for-bit.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data import ProteinTokenizer, TokenStream, load_proteins, split
from ..models import PerformerConfig, PerformerLM
from ..nn import FeatureRedrawer, mix_seed
from .checkpoint import (
    CheckpointError,
    atomic_write_text,
    load_checkpoint,
    load_model_state,
    optimizer_from_tensors,
    save_checkpoint,
)

__all__ = ["TrainConfig", "PRESETS", "resolve_config", "train", "evaluate_bpr", "plot_log", "load_lm"]

log = logging.getLogger(__name__)
LN2 = math.log(2.0)
_BATCH_STREAM = 1  # mix_seed(seed, _BATCH_STREAM, step): keeps batch draws apart from other uses


@dataclass(frozen=True)
class TrainConfig:
    """How to train. ``data=None`` uses the embedded Swiss-Prot extract."""

    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_windows: int = 64
    log_every: int = 10
    checkpoint_every: int = 200
    redraw_interval: int = 0
    seed: int = 0
    val_fraction: float = 0.05
    data: str | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_windows", "log_every", "checkpoint_every"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"train.{name} must be a positive int, got {val!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"train.lr must be > 0, got {self.lr!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"train.warmup must be a non-negative int, got {self.warmup!r}")


#: preset name -> (model config kwargs without vocab_size, TrainConfig kwargs)
PRESETS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "tiny": (
        {"dim": 32, "depth": 2, "heads": 2},
        {
            "steps": 60,
            "batch_size": 8,
            "seq_len": 64,
            "lr": 3e-3,
            "warmup": 5,
            "eval_every": 20,
            "eval_windows": 16,
            "log_every": 1,
            "checkpoint_every": 20,
        },
    ),
    "small": (
        {"dim": 128, "depth": 4, "heads": 4},
        {
            "steps": 2000,
            "batch_size": 16,
            "seq_len": 256,
            "lr": 1e-3,
            "warmup": 100,
            "eval_every": 200,
            "eval_windows": 64,
            "log_every": 10,
            "checkpoint_every": 200,
            "redraw_interval": 0,
        },
    ),
    "base": (
        {"dim": 256, "depth": 6, "heads": 8},
        {
            "steps": 20000,
            "batch_size": 32,
            "seq_len": 1024,
            "lr": 6e-4,
            "warmup": 500,
            "eval_every": 1000,
            "eval_windows": 64,
            "log_every": 20,
            "checkpoint_every": 1000,
        },
    ),
}


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    with open(path, "rb") as f:
        data = tomllib.load(f)
    unknown = sorted(set(data) - {"model", "train"})
    if unknown:
        raise ValueError(f"{path}: unknown top-level tables {unknown}; expected [model] and [train]")
    return data


def resolve_config(
    *, preset: str = "tiny", config_file: str | Path | None = None, **overrides: Any
) -> tuple[PerformerConfig, TrainConfig]:
    """Preset, then the TOML file's [model]/[train] tables, then ``overrides`` (train
    fields, or model fields ``kernel`` and ``attention``; None values are ignored)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    model_kw, train_kw = dict(PRESETS[preset][0]), dict(PRESETS[preset][1])
    if config_file is not None:
        data = _load_toml(Path(config_file))
        model_kw.update(data.get("model", {}))
        train_kw.update(data.get("train", {}))
    model_fields = {f.name for f in dataclasses.fields(PerformerConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for key, val in overrides.items():
        if val is None:
            continue
        if key in train_fields:
            train_kw[key] = val
        elif key in model_fields:
            model_kw[key] = val
        else:
            raise ValueError(f"unknown config override {key!r}")
    unknown = sorted(set(train_kw) - train_fields)
    if unknown:
        raise ValueError(f"unknown [train] keys {unknown}; known: {sorted(train_fields)}")
    model_kw.setdefault("vocab_size", ProteinTokenizer().vocab_size)
    model_kw.setdefault("seed", train_kw.get("seed", 0))
    return PerformerConfig.from_dict(model_kw), TrainConfig(**train_kw)


def _lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr."""
    if cfg.warmup and step <= cfg.warmup:
        return cfg.lr * step / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def set_learning_rate(optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig) -> float:
    """Put the schedule's learning rate for ``step`` into every parameter group; returns it."""
    lr = _lr_at(step, cfg)
    for g in optimizer.param_groups:
        g["lr"] = lr
    return lr


def step_batch(stream: TokenStream, step: int, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of ``step``: a function of (seed, step) only, so a resumed run and every
    process of a distributed run draw exactly the same tokens."""
    gen = torch.Generator().manual_seed(mix_seed(cfg.seed, _BATCH_STREAM, step))
    return stream.batch(cfg.batch_size, cfg.seq_len, gen)


@torch.no_grad()
def evaluate_bpr(model: PerformerLM, inputs: torch.Tensor, targets: torch.Tensor, *, batch_size: int = 16) -> float:
    """Bits per residue: mean cross-entropy over targets that are residues, in bits."""
    was = model.training
    model.eval()
    tok = ProteinTokenizer()
    total, count = 0.0, 0
    for i in range(0, inputs.shape[0], batch_size):
        x, y = inputs[i : i + batch_size], targets[i : i + batch_size]
        logits = model(x)
        nll = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none")
        keep = tok.is_residue(y.flatten())
        total += float(nll[keep].sum())
        count += int(keep.sum())
    model.train(was)
    return total / max(1, count) / LN2


def _make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def _read_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            break
    return rows


def _config_dict(model_cfg: PerformerConfig, train_cfg: TrainConfig) -> dict[str, Any]:
    return {"model": model_cfg.to_dict(), "train": dataclasses.asdict(train_cfg)}


def restore_run(
    out_dir: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    config: dict[str, Any],
    *,
    rng_key: str = "rng.torch",
) -> int:
    """Load the run's LATEST checkpoint into ``model``, ``optimizer`` and the torch RNG
    (the state saved under ``rng_key``), after checking it was written with ``config``;
    returns its step. Errors are CheckpointError naming the file."""
    ckpt = load_checkpoint(out_dir)
    if ckpt.config != config:
        diff = sorted(
            f"{sec}.{k}"
            for sec in ("model", "train")
            for k in set(config[sec]) | set(ckpt.config.get(sec, {}))
            if config[sec].get(k) != ckpt.config.get(sec, {}).get(k)
        )
        raise CheckpointError(f"{ckpt.path / 'config.json'} does not match this run's config (differs in {diff})")
    load_model_state(model, ckpt)
    tensors = ckpt.optimizer_tensors()
    opt_path = ckpt.path / "optimizer.safetensors"
    try:
        optimizer.load_state_dict(optimizer_from_tensors(tensors, ckpt.trainer["optimizer"]))
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{opt_path} does not fit the optimiser: {e}") from None
    if rng_key not in tensors:
        raise CheckpointError(f"{opt_path} lacks the RNG state {rng_key!r}")
    try:
        torch.set_rng_state(tensors[rng_key])
    except (RuntimeError, TypeError) as e:
        raise CheckpointError(f"{opt_path}: {rng_key!r} is not a torch RNG state: {e}") from None
    return ckpt.step


def truncate_log(log_path: str | Path, step: int) -> None:
    """Keep the log rows up to ``step`` (the checkpoint resumed from), atomically."""
    kept = [r for r in _read_log(Path(log_path)) if r.get("step", 0) <= step]
    atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in kept))


def load_lm(path: str | Path) -> tuple[PerformerLM, dict[str, Any]]:
    """A PerformerLM and its config dict from a checkpoint (run dir or step dir)."""
    ckpt = load_checkpoint(path)
    try:
        model_cfg = PerformerConfig.from_dict(ckpt.config.get("model"))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt.path / 'config.json'}: bad model config: {e}") from None
    model = PerformerLM(model_cfg)
    load_model_state(model, ckpt)
    return model, ckpt.config


def train(
    out_dir: str | Path,
    model_cfg: PerformerConfig,
    train_cfg: TrainConfig,
    *,
    resume: bool = False,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    time_limit: float | None = None,
    throttle: float = 0.0,
    stop_at: int | None = None,
    write_plot: bool = True,
) -> dict[str, Any]:
    """Train a PerformerLM; writes DIR/log.jsonl, DIR/checkpoints/, DIR/loss.png.

    ``on_step(row)`` is called after every step (row has step, loss, tokens_per_s, and
    val_bpr when evaluated) so a caller can drive a progress bar. ``time_limit`` (seconds)
    stops early after the step that crosses it; ``stop_at``
    stops (with a checkpoint) after that step, as if interrupted. ``throttle`` sleeps that long per step
    (tests use it to kill a run mid-way). Returns a summary dict.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "log.jsonl"
    config = _config_dict(model_cfg, train_cfg)
    model = PerformerLM(model_cfg)
    optimizer = _make_optimizer(model, train_cfg)
    start = 0
    if resume:
        start = restore_run(out, model, optimizer, config)
        truncate_log(log_path, start)
    else:
        if log_path.exists():
            log_path.unlink()
        torch.manual_seed(mix_seed(train_cfg.seed, 2))
    tok = ProteinTokenizer()
    train_recs, val_recs = split(
        load_proteins(train_cfg.data), val_fraction=train_cfg.val_fraction, seed=train_cfg.seed
    )
    train_stream, val_stream = TokenStream(train_recs, tok), TokenStream(val_recs, tok)
    val_x, val_y = val_stream.windows(train_cfg.seq_len, train_cfg.eval_windows)
    redrawer = FeatureRedrawer(model, train_cfg.redraw_interval, model_cfg.seed)
    model.train()
    t0 = time.perf_counter()
    tokens_done, last = 0, {}
    val_bpr = None
    step = start
    with open(log_path, "a", encoding="utf-8") as logf:
        for step in range(start + 1, train_cfg.steps + 1):
            ts = time.perf_counter()
            lr = set_learning_rate(optimizer, step, train_cfg)
            x, y = step_batch(train_stream, step, train_cfg)
            logits = model(x)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if train_cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
            optimizer.step()
            redrawer.step(step)
            tokens_done += x.numel()
            elapsed = time.perf_counter() - t0
            row: dict[str, Any] = {
                "step": step,
                "loss": float(loss.detach()),
                "lr": lr,
                "tokens_per_s": x.numel() / max(1e-9, time.perf_counter() - ts),
                "time": elapsed,
            }
            final = step == train_cfg.steps or step == stop_at or (time_limit is not None and elapsed >= time_limit)
            if step % train_cfg.eval_every == 0 or final:
                val_bpr = evaluate_bpr(model, val_x, val_y)
                row["val_bpr"] = val_bpr
            if step % train_cfg.log_every == 0 or "val_bpr" in row or final:
                logf.write(json.dumps(row) + "\n")
                logf.flush()
            if step % train_cfg.checkpoint_every == 0 or final:
                logf.flush()
                save_checkpoint(
                    out, step=step, model=model, config=config, optimizer=optimizer, extra={"val_bpr": val_bpr}
                )
            last = row
            if on_step is not None:
                on_step(row)
            if throttle:
                time.sleep(throttle)
            if final:
                break
    wall = time.perf_counter() - t0
    return finish_run(
        out, log_path, model, write_plot=write_plot, step=step, start=start, last=last, val_bpr=val_bpr,
        tokens=tokens_done, wall=wall,
    )  # fmt: skip


def finish_run(
    out: Path,
    log_path: Path,
    model: PerformerLM,
    *,
    write_plot: bool,
    step: int,
    start: int,
    last: dict[str, Any],
    val_bpr: float | None,
    tokens: int,
    wall: float,
    title: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The end of a training run (one process or distributed): DIR/loss.png from the log
    (unless ``write_plot`` is False or matplotlib is missing) and the summary dict
    ``train`` returns; ``extra`` joins it (e.g. the number of processes)."""
    if write_plot:
        try:
            plot_log(log_path, out / "loss.png", title=title)
        except ImportError:
            log.warning("matplotlib is not installed (pip install favor[plot]): no loss.png")
    return {
        "steps": step,
        "start_step": start,
        "loss": last.get("loss"),
        "val_bpr": val_bpr,
        "tokens_per_s": tokens / max(1e-9, wall),
        "seconds": wall,
        **(extra or {}),
        "model": model,
    }


def plot_log(
    log_path: str | Path, png_path: str | Path, *, title: str | None = None, others: dict | None = None
) -> Path:
    """Training loss (bits per token) and validation bits per residue against step.

    ``others`` maps a label to another log path drawn on the same axes (the demo's softmax run).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {"": Path(log_path)} if not others else {"favor": Path(log_path), **{k: Path(v) for k, v in others.items()}}
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, path in runs.items():
        rows = _read_log(path)
        steps = [r["step"] for r in rows]
        line = ax.plot(steps, [r["loss"] / LN2 for r in rows], alpha=0.5, label=f"{label} train (bits/token)".strip())
        val = [(r["step"], r["val_bpr"]) for r in rows if "val_bpr" in r]
        if val:
            ax.plot(
                *zip(*val, strict=False),
                "o-",
                color=line[0].get_color(),
                label=f"{label} validation (bits/residue)".strip(),
            )
    ax.axhline(math.log2(20), color="gray", ls=":", label="uniform over 20 residues")
    ax.set_xlabel("step")
    ax.set_ylabel("bits")
    ax.set_title(title or "Performer LM on Swiss-Prot proteins")
    ax.legend(fontsize=8)
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
