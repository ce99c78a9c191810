"""Training a Performer LM on proteins or text: deterministic, resumable, logged.

Everything a step does is a function of (config, step): the batch is drawn from a
generator seeded by (seed, step), the feature redraws by (seed, layer, step), the learning
rate by the step. A checkpoint therefore needs only weights, optimiser tensors, the torch
RNG state (for dropout) and the step, and ``resume=True`` continues bit-for-bit.

Data comes through ``favor.data.load_training_data`` (FASTA, plain text as bytes or a
Hugging Face tokenizer's ids, or a directory of either). The objective is causal
(PerformerLM, next-token targets) or masked (PerformerEncoder, BERT-style masking); the
held-out score is bits per residue, byte or token. ``train`` writes DIR/summary.json.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data import OBJECTIVES, ProteinTokenizer, TokenStream, TrainingData, load_training_data, model_vocab
from ..models import PerformerConfig, PerformerEncoder, PerformerLM
from ..nn import FeatureRedrawer, mix_seed
from .checkpoint import (
    CheckpointError,
    atomic_write_text,
    load_checkpoint,
    load_model_state,
    optimizer_from_tensors,
    save_checkpoint,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

__all__ = [
    "TrainConfig",
    "PRESETS",
    "resolve_config",
    "train",
    "evaluate_bpr",
    "evaluate_bits",
    "plot_log",
    "load_lm",
    "load_data",
    "Split",
    "read_log",
    "token_log_frequencies",
    "OUTPUT_BIAS_INITS",
]

log = logging.getLogger(__name__)
LN2 = math.log(2.0)
_BATCH_STREAM = 1  # mix_seed(seed, _BATCH_STREAM, step): keeps batch draws apart from other uses


@dataclass(frozen=True)
class TrainConfig:
    """How to train. ``data=None`` uses the embedded Swiss-Prot extract; ``data`` is a
    FASTA or text file or a directory of them, ``eval_data`` the held-out data (default:
    a ``val_fraction`` share of ``data``), ``tokenizer`` a Hugging Face tokenizer directory
    for text (default: UTF-8 bytes). ``seq_len`` is the context (``--context``)."""

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
    eval_data: str | None = None
    tokenizer: str | None = None
    objective: str = "causal"
    #: how a model with ``output_bias`` starts its logit bias (OUTPUT_BIAS_INITS): "zeros",
    #: or "unigram", the log of the training tokens' frequencies (add-one), so that step 0
    #: already predicts them and the first updates go to what the context adds
    output_bias_init: str = "zeros"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_windows", "log_every", "checkpoint_every"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"train.{name} must be a positive int, got {val!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"train.lr must be > 0, got {self.lr!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"train.warmup must be a non-negative int, got {self.warmup!r}")
        if self.seq_len < 2:
            raise ValueError(f"train.seq_len (the context, --context) must be >= 2, got {self.seq_len}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"train.objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.output_bias_init not in OUTPUT_BIAS_INITS:
            raise ValueError(
                f"train.output_bias_init must be one of {sorted(OUTPUT_BIAS_INITS)}, got {self.output_bias_init!r}"
            )
        for name in ("data", "eval_data", "tokenizer"):  # kept as str: the config goes to JSON
            val = getattr(self, name)
            if val is not None and not isinstance(val, str):
                object.__setattr__(self, name, str(val))


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
    # a byte-level text LM for a 2-core CPU: ~8k tokens/s with one thread, so a step of
    # 4 x 1024 bytes takes ~0.5 s and 200 steps fit in ~2 minutes (--minutes cuts earlier)
    "text": (
        # M = 64 (2D): beside an exact window the features only estimate the far keys; the
        # hybrid's step then costs 1.20x softmax's at 1,024 instead of 1.45x (docs/paper.md)
        {"dim": 128, "depth": 3, "heads": 4, "num_features": 64},
        {
            "steps": 200,
            "batch_size": 4,
            "seq_len": 1024,
            "lr": 2e-3,
            "warmup": 20,
            "eval_every": 25,
            "eval_windows": 8,
            "log_every": 5,
            "checkpoint_every": 100,
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
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    with open(path, "rb") as f:
        data = tomllib.load(f)
    unknown = sorted(set(data) - {"model", "train"})
    if unknown:
        raise ValueError(f"{path}: unknown top-level tables {unknown}; expected [model] and [train]")
    return data


def resolve_config(
    *,
    preset: str = "tiny",
    config_file: str | Path | None = None,
    model: dict[str, Any] | None = None,
    **overrides: Any,
) -> tuple[PerformerConfig, TrainConfig]:
    """Preset, then the TOML file's [model]/[train] tables, then ``model`` (PerformerConfig
    fields) and ``overrides`` (train fields, or model fields such as ``kernel`` and
    ``attention``); None values are ignored. The vocabulary follows the data, tokenizer and
    objective (``favor.data.model_vocab``) unless the config sets ``vocab_size``."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    model_kw, train_kw = dict(PRESETS[preset][0]), dict(PRESETS[preset][1])
    if config_file is not None:
        data = _load_toml(Path(config_file))
        model_kw.update(data.get("model", {}))
        train_kw.update(data.get("train", {}))
    model_fields = {f.name for f in dataclasses.fields(PerformerConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for key, val in (model or {}).items():
        if key not in model_fields:
            raise ValueError(f"unknown model override {key!r}; known: {sorted(model_fields)}")
        if val is not None:
            model_kw[key] = val
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
    train_cfg = TrainConfig(**train_kw)
    if "vocab_size" not in model_kw:
        model_kw["vocab_size"] = model_vocab(
            train_cfg.data, tokenizer=train_cfg.tokenizer, objective=train_cfg.objective
        )
    model_kw.setdefault("seed", train_cfg.seed)
    return PerformerConfig.from_dict(model_kw), train_cfg


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


def step_batch(stream: TokenStream | TrainingData, step: int, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of ``step`` (masked, for a TrainingData with the masked objective): a
    function of (seed, step) only, so a resumed run and every process of a distributed run
    draw exactly the same tokens."""
    gen = torch.Generator().manual_seed(mix_seed(cfg.seed, _BATCH_STREAM, step))
    return stream.batch(cfg.batch_size, cfg.seq_len, gen)


def model_logits(model: PerformerLM | PerformerEncoder, x: torch.Tensor) -> torch.Tensor:
    """Token logits (B, L, vocab) of an LM or, through its tied embedding, an encoder."""
    return model.logits(model(x)) if isinstance(model, PerformerEncoder) else model(x)


@torch.no_grad()
def evaluate_bits(
    model: PerformerLM | PerformerEncoder,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    counted: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 16,
) -> float:
    """Mean cross-entropy in bits over the targets ``counted(targets)`` marks."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, inputs.shape[0], batch_size):
        x, y = inputs[i : i + batch_size], targets[i : i + batch_size]
        logits = model_logits(model, x)
        nll = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none")
        keep = counted(y.flatten())
        total += float(nll[keep].sum())
        count += int(keep.sum())
    model.train(was)
    return total / max(1, count) / LN2


def evaluate_bpr(model: PerformerLM, inputs: torch.Tensor, targets: torch.Tensor, *, batch_size: int = 16) -> float:
    """Bits per residue: mean cross-entropy over targets that are residues, in bits."""
    return evaluate_bits(model, inputs, targets, counted=ProteinTokenizer().is_residue, batch_size=batch_size)


def load_data(cfg: TrainConfig) -> TrainingData:
    """The run's training and held-out data (``favor.data.load_training_data``)."""
    return load_training_data(
        cfg.data, eval_data=cfg.eval_data, tokenizer=cfg.tokenizer, objective=cfg.objective,
        val_fraction=cfg.val_fraction, seed=cfg.seed,
    )  # fmt: skip


def make_model(model_cfg: PerformerConfig, train_cfg: TrainConfig) -> PerformerLM | PerformerEncoder:
    """PerformerLM for the causal objective, PerformerEncoder for the masked one."""
    return PerformerEncoder(model_cfg) if train_cfg.objective == "masked" else PerformerLM(model_cfg)


def token_log_frequencies(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(vocab_size,) natural log of each token's frequency in ``tokens``, add-one smoothed
    (a token never seen gets a count of 1): the byte-frequency (unigram) model."""
    counts = torch.bincount(tokens.flatten(), minlength=vocab_size).double()[:vocab_size]
    return ((counts + 1) / (counts + 1).sum()).log()


#: TrainConfig.output_bias_init -> the logit bias a new model starts with, from (data, model)
OUTPUT_BIAS_INITS: dict[str, Callable[[TrainingData, PerformerLM | PerformerEncoder], torch.Tensor]] = {
    "zeros": lambda data, model: torch.zeros(model.config.vocab_size),
    "unigram": lambda data, model: token_log_frequencies(data.train.tokens, model.config.vocab_size),
}


def init_output_bias(model: PerformerLM | PerformerEncoder, data: TrainingData, how: str) -> None:
    """Set a new model's logit bias as ``how`` (OUTPUT_BIAS_INITS) says; a model without one
    accepts only "zeros" (what it computes already)."""
    if how not in OUTPUT_BIAS_INITS:
        raise ValueError(f"output_bias_init must be one of {sorted(OUTPUT_BIAS_INITS)}, got {how!r}")
    if model.logit_bias is None:
        if how != "zeros":
            raise ValueError(f"train.output_bias_init={how!r} needs a model with a logit bias (model.output_bias=True)")
        return
    with torch.no_grad():
        model.logit_bias.copy_(OUTPUT_BIAS_INITS[how](data, model).to(model.logit_bias))


def _make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def read_log(path: Path) -> list[dict[str, Any]]:
    """The rows of a run's ``log.jsonl`` (none if the file does not exist)."""
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
    saved = {sec: dict(ckpt.config.get(sec, {})) for sec in ("model", "train")}
    for f in dataclasses.fields(TrainConfig):  # fields added since the checkpoint was written
        saved["train"].setdefault(f.name, f.default)
    for f in dataclasses.fields(PerformerConfig):
        if f.default is not dataclasses.MISSING:
            saved["model"].setdefault(f.name, f.default)
    if saved != {sec: config.get(sec) for sec in ("model", "train")} or set(ckpt.config) - {"model", "train"}:
        diff = sorted(
            f"{sec}.{k}"
            for sec in ("model", "train")
            for k in set(config[sec]) | set(saved[sec])
            if config[sec].get(k) != saved[sec].get(k)
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
    kept = [r for r in read_log(Path(log_path)) if r.get("step", 0) <= step]
    atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in kept))


def load_lm(path: str | Path) -> tuple[PerformerLM | PerformerEncoder, dict[str, Any]]:
    """A PerformerLM (a PerformerEncoder for a masked-LM run) and its config dict from a
    checkpoint (run dir or step dir)."""
    ckpt = load_checkpoint(path)
    try:
        model_cfg = PerformerConfig.from_dict(ckpt.config.get("model"))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt.path / 'config.json'}: bad model config: {e}") from None
    masked = ckpt.config.get("train", {}).get("objective") == "masked"
    model = PerformerEncoder(model_cfg) if masked else PerformerLM(model_cfg)
    load_model_state(model, ckpt)
    return model, ckpt.config


class Split:
    """How ``train`` splits a step's work across processes: this base class is one process
    (the whole batch, the plain forward and mean loss, nothing to reduce; this process
    evaluates and writes the log, checkpoints, plot and summary).

    ``favor.distributed.train.RankSplit`` splits each batch's positions or rows across the
    ranks of a process group, sums the gradients and losses over them, and lets rank 0 write.
    The loop itself (schedule, batches, redraws, evaluation, log, checkpoints, resume) is the
    same for every split."""

    #: whether this process evaluates and writes the log, checkpoints, plot and summary
    writes: bool = True
    #: where the model and its batches live
    device: torch.device = torch.device("cpu")
    #: the checkpoint tensor this process restores its torch RNG state from on resume
    rng_key: str = "rng.torch"
    #: the loss plot's title (None: ``plot_log``'s default)
    title: str | None = None

    def tags(self) -> dict[str, Any]:
        """Entries added to every log row and to the summary (e.g. the number of processes)."""
        return {}

    def loss(self, model: PerformerLM | PerformerEncoder, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """This process's loss for the step's full batch ``(x, y)``; the processes' losses
        (and gradients) add up to the batch's mean cross-entropy."""
        logits = model_logits(model, x)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())  # masked LM: targets -100 are ignored

    def reduce_gradients(self, model: torch.nn.Module) -> None:
        """Sum the parameters' gradients over the processes (nothing to do for one)."""

    def global_loss(self, loss: torch.Tensor) -> float:
        """The step's loss over the whole batch (every process calls this)."""
        return float(loss.detach())

    def rng_tensors(self) -> dict[str, torch.Tensor] | None:
        """Extra tensors a checkpoint keeps besides this process's RNG state (every process
        calls this at a checkpoint step)."""
        return None


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
    split: Split | None = None,
) -> dict[str, Any]:
    """Train a PerformerLM; writes DIR/log.jsonl, DIR/checkpoints/, DIR/loss.png.

    ``on_step(row)`` is called after every step (row has step, loss, tokens_per_s, and
    val_bpr, held-out bits per residue/byte/token, when evaluated) so a caller can drive a
    progress bar. ``time_limit`` (seconds) stops early, with an evaluation and a
    checkpoint, after the step that crosses it; ``stop_at``
    stops (with a checkpoint) after that step, as if interrupted. ``throttle`` sleeps that long per step
    (tests use it to kill a run mid-way). ``split`` says how a step's work is shared by
    processes (default ``Split()``: one process; see ``favor.distributed.train``).
    Returns a summary dict.
    """
    split = Split() if split is None else split
    out = Path(out_dir)
    if split.writes:
        out.mkdir(parents=True, exist_ok=True)
    log_path = out / "log.jsonl"
    config = _config_dict(model_cfg, train_cfg)
    data = load_data(train_cfg)  # first: a missing or empty file fails before anything is written
    val_x = val_y = None
    if split.writes:
        heldout = data.heldout_windows(train_cfg.seq_len, train_cfg.eval_windows, seed=train_cfg.seed)
        val_x, val_y = (t.to(split.device) for t in heldout)
    model = make_model(model_cfg, train_cfg)
    init_output_bias(model, data, train_cfg.output_bias_init)  # a resumed run then loads its own
    model = model.to(split.device)
    optimizer = _make_optimizer(model, train_cfg)
    start = 0
    if resume:
        start = restore_run(out, model, optimizer, config, rng_key=split.rng_key)
        if split.writes:
            truncate_log(log_path, start)
    else:
        if split.writes and log_path.exists():
            log_path.unlink()
        torch.manual_seed(mix_seed(train_cfg.seed, 2))
    redrawer = FeatureRedrawer(model, train_cfg.redraw_interval, model_cfg.seed)
    model.train()
    t0 = time.perf_counter()
    tokens_done, last = 0, {}
    val_bpr = None
    step = start
    logf = open(log_path, "a", encoding="utf-8") if split.writes else None  # noqa: SIM115 (closed below)
    try:
        for step in range(start + 1, train_cfg.steps + 1):
            ts = time.perf_counter()
            lr = set_learning_rate(optimizer, step, train_cfg)
            x, y = step_batch(data, step, train_cfg)
            loss = split.loss(model, x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            split.reduce_gradients(model)
            if train_cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
            optimizer.step()
            redrawer.step(step)
            tokens_done += x.numel()
            loss_value = split.global_loss(loss)
            elapsed = time.perf_counter() - t0
            row: dict[str, Any] = {
                "step": step,
                "loss": loss_value,
                "lr": lr,
                "tokens_per_s": x.numel() / max(1e-9, time.perf_counter() - ts),
                "time": elapsed,
                **split.tags(),
            }
            final = step == train_cfg.steps or step == stop_at or (time_limit is not None and elapsed >= time_limit)
            checkpoint = step % train_cfg.checkpoint_every == 0 or final
            rng = split.rng_tensors() if checkpoint else None
            if logf is not None:
                if step % train_cfg.eval_every == 0 or final:
                    val_bpr = evaluate_bits(model, val_x, val_y, counted=data.counted)
                    row["val_bpr"] = val_bpr
                if step % train_cfg.log_every == 0 or "val_bpr" in row or final:
                    logf.write(json.dumps(row) + "\n")
                    logf.flush()
                if checkpoint:
                    save_checkpoint(
                        out,
                        step=step,
                        model=model,
                        config=config,
                        optimizer=optimizer,
                        extra={"val_bpr": val_bpr, "data_format": data.format},
                        extra_tensors=rng,
                    )
            last = row
            if on_step is not None:
                on_step(row)
            if throttle:
                time.sleep(throttle)
            if final:
                break
    finally:
        if logf is not None:
            logf.close()
    wall = time.perf_counter() - t0
    stopped = "steps" if step == train_cfg.steps else "stop_at" if step == stop_at else "time_limit"
    return finish_run(
        out, log_path, model, write_plot=split.writes and write_plot, step=step, start=start, last=last,
        val_bpr=val_bpr, tokens=tokens_done, wall=wall, title=split.title, extra=split.tags(), unit=data.unit,
        summary=run_summary(model_cfg, train_cfg, unit=data.unit, stopped=stopped, time_limit=time_limit),
    )  # fmt: skip


def run_summary(
    model_cfg: PerformerConfig, train_cfg: TrainConfig, *, unit: str, stopped: str, time_limit: float | None
) -> dict[str, Any]:
    """What summary.json says about a run besides its numbers."""
    return {
        "objective": train_cfg.objective,
        "context": train_cfg.seq_len,
        "attention": model_cfg.attention,
        "kernel": model_cfg.kernel,
        "data": train_cfg.data or "embedded Swiss-Prot extract",
        "eval_data": train_cfg.eval_data or f"held-out {train_cfg.val_fraction:g} of data",
        "tokenizer": train_cfg.tokenizer or ("residues" if unit == "residue" else "bytes"),
        "unit": unit,
        "vocab_size": model_cfg.vocab_size,
        "parameters": None,  # filled by finish_run from the model
        "stopped_by": stopped,
        "time_limit_s": time_limit,
    }


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
    unit: str = "residue",
    summary: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The end of a training run (one process or distributed): DIR/loss.png from the log
    (unless ``write_plot`` is False or matplotlib is missing) and the summary dict
    ``train`` returns; ``extra`` joins it (e.g. the number of processes). With ``summary``
    (``run_summary``'s dict) the result, less the model, is also written to DIR/summary.json
    (when ``write_plot`` is True, i.e. on the process that writes files)."""
    if write_plot:
        try:
            plot_log(log_path, out / "loss.png", title=title, unit=unit)
        except ImportError:
            log.warning("matplotlib is not installed (pip install favor[plot]): no loss.png")
    result = {
        "steps": step,
        "start_step": start,
        "loss": last.get("loss"),
        "val_bpr": val_bpr,
        "val_bits_per_token": val_bpr,
        "tokens_per_s": tokens / max(1e-9, wall),
        "seconds": wall,
        **(extra or {}),
    }
    if summary is not None:
        result.update({**summary, "parameters": sum(p.numel() for p in model.parameters())})
        if write_plot:
            atomic_write_text(out / "summary.json", json.dumps(result, indent=2) + "\n")
    return {**result, "model": model}


#: held-out unit -> (its uniform-guess bits, that line's label)
_CHANCE = {"residue": (math.log2(20), "uniform over 20 residues"), "byte": (8.0, "uniform over 256 bytes")}


def plot_log(
    log_path: str | Path,
    png_path: str | Path,
    *,
    title: str | None = None,
    others: dict | None = None,
    unit: str = "residue",
) -> Path:
    """Training loss (bits per token) and held-out bits per ``unit`` against step.

    ``others`` maps a label to another log path drawn on the same axes (the demo's softmax run).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {"": Path(log_path)} if not others else {"favor": Path(log_path), **{k: Path(v) for k, v in others.items()}}
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, path in runs.items():
        rows = read_log(path)
        steps = [r["step"] for r in rows]
        line = ax.plot(steps, [r["loss"] / LN2 for r in rows], alpha=0.5, label=f"{label} train (bits/token)".strip())
        val = [(r["step"], r["val_bpr"]) for r in rows if "val_bpr" in r]
        if val:
            ax.plot(
                *zip(*val, strict=False),
                "o-",
                color=line[0].get_color(),
                label=f"{label} held-out (bits/{unit})".strip(),
            )
    if unit in _CHANCE:
        ax.axhline(_CHANCE[unit][0], color="gray", ls=":", label=_CHANCE[unit][1])
    ax.set_xlabel("step")
    ax.set_ylabel("bits")
    default = "Performer LM on Swiss-Prot proteins" if unit == "residue" else f"Performer LM, held-out bits per {unit}"
    ax.set_title(title or default)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
