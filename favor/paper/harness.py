"""Training attention variants of one model at equal steps, and comparing them at equal time.

``Variant`` names an attention (exact softmax, FAVOR with a kernel, projection norm and
redraw choice, or a peer library's attention in the same skeleton). ``build_model`` makes
favor's PerformerLM (causal) or PerformerEncoder (bidirectional) with that attention;
``train_run`` trains it on a task (favor.paper.tasks) and returns its curve: evaluation
metrics against step and against training wall time (evaluation excluded). ``compare``
reads the curves at the last common step and at the largest wall time every run reached.
"""

from __future__ import annotations

import importlib.util
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..models import PerformerConfig, PerformerEncoder, PerformerLM
from ..nn import FeatureRedrawer, feature_maps, redraw_features
from ..ops.local.spec import ExactTerms
from .peers import build_peer_model

__all__ = [
    "Variant",
    "ModelSize",
    "hybrid",
    "HYBRID_WINDOW",
    "HYBRID_SINKS",
    "build_model",
    "train_run",
    "at_time",
    "compare",
    "unavailable",
    "plot_curves",
]


@dataclass(frozen=True)
class Variant:
    """One attention setting. ``attention``: "softmax" (exact), "favor", or a peer
    ("linformer", "reformer"); ``kernel`` and ``norm`` ("chi" or SMREG's "sqrt_d") pick the
    FAVOR features; ``redraw`` says whether features are redrawn during training;
    ``depth`` overrides the model depth (the paper's 12-layer Reformer vs 6-layer Performer);
    ``window`` > 0 makes the hybrid Performer: FAVOR plus exact softmax weights for each
    query's last ``window`` + 1 keys (its ``window`` neighbours on each side, bidirectional)
    and the first ``sinks`` tokens (``favor.ExactTerms``), one normaliser; ``far_gain`` (a
    float, hybrids only) adds a learnable per-head log weight on the far keys' FAVOR estimate,
    initialised to it (``PerformerConfig.far_gain``); ``num_features`` overrides the model
    size's number of random features (M)."""

    name: str
    attention: str = "favor"
    kernel: str = "positive"
    norm: str = "chi"
    redraw: bool = True
    depth: int | None = None
    window: int = 0
    sinks: int = 0
    far_gain: float | None = None
    num_features: int | None = None


#: the hybrid Performer's exact terms in the paper's experiments: a 64-key window and 4 sinks
#: (chosen over W=16, S=1 by the text measurement in docs/paper.md, "The hybrid Performer")
HYBRID_WINDOW, HYBRID_SINKS = 64, 4
#: the hybrid keeps its first draw of features: in books (L = 2,048) it learns the same drawn
#: once as redrawn every step (masked accuracy 0.177 / 0.373 against 0.177 / 0.371 on seeds
#: 0 / 1) without a QR per step (0.29-0.39 s per step against 0.81-1.07 s, at different
#: machine loads; docs/paper.md, "The hybrid Performer")


def hybrid(
    prefix: str = "hybrid FAVOR+", *, window: int = HYBRID_WINDOW, sinks: int = HYBRID_SINKS, redraw: bool = False, **kw
) -> Variant:
    """The hybrid Performer variant, named ``prefix (W=.. S=..)``: FAVOR+ (positive
    features, drawn once: see the note above) with the exact window and sinks."""
    return Variant(
        f"{prefix} (W={window} S={sinks})", kernel="positive", window=window, sinks=sinks, redraw=redraw, **kw
    )


@dataclass(frozen=True)
class ModelSize:
    dim: int = 64
    depth: int = 2
    heads: int = 2
    num_features: int | None = None
    max_len: int = 2048
    dropout: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    #: a learnable logit bias (PerformerConfig.output_bias); train_run(logit_bias=...) starts it
    output_bias: bool = False


PEERS = {"linformer": "linformer", "reformer": "reformer_pytorch"}


def unavailable(variant: Variant) -> str | None:
    """Why ``variant`` cannot run here (a peer library that is not installed), else None."""
    mod = PEERS.get(variant.attention)
    if mod is not None and importlib.util.find_spec(mod) is None:
        return f"{mod} is not installed (pip install --no-deps {mod.replace('_', '-')})"
    return None


def build_model(variant: Variant, size: ModelSize, *, vocab_size: int, causal: bool, seed: int):
    """favor's PerformerLM / PerformerEncoder with ``variant``'s attention; initial weights
    depend on ``seed`` only, so every variant of a seed starts from the same weights."""
    if variant.attention in PEERS:
        return build_peer_model(variant, size, vocab_size=vocab_size, causal=causal, seed=seed)
    cfg = PerformerConfig(
        vocab_size=vocab_size,
        dim=size.dim,
        depth=variant.depth or size.depth,
        heads=size.heads,
        dropout=size.dropout,
        attention=variant.attention,
        kernel=variant.kernel,
        num_features=variant.num_features or size.num_features,
        max_len=size.max_len,
        seed=seed,
        exact=ExactTerms(variant.window, sinks=variant.sinks) if variant.window else None,
        far_gain=variant.far_gain,
        output_bias=size.output_bias,
    )
    model = (PerformerLM if causal else PerformerEncoder)(cfg)
    if variant.norm != "chi":
        for fm in feature_maps(model):
            fm.norm = variant.norm
        redraw_features(model, seed, 0)
    return model


def train_run(
    task,
    variant: Variant,
    size: ModelSize,
    *,
    seed: int,
    steps: int,
    eval_every: int,
    lr: float = 1e-3,
    warmup: int = 20,
    weight_decay: float = 0.1,
    grad_clip: float = 0.5,
    redraw_interval: int = 1,
    model=None,
    time_limit: float | None = None,
    progress: Callable[[int], None] | None = None,
    logit_bias: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Train ``variant`` for ``steps`` steps (Adam, the paper's fixed lr after a linear
    warm-up, clip 0.5, weight decay 0.1); evaluate at step 0 and every ``eval_every`` steps.

    Returns {"variant", "seed", "curve": [{step, time, cpu_time, train_loss, loss, accuracy,
    perplexity, bits}], "diverged_at", "sec_per_step", "params"}: ``time`` is training wall
    time (perf_counter), ``cpu_time`` the process's CPU time over the same steps
    (process_time: what other jobs on the machine do not inflate at one thread). A non-finite training loss
    stops the run and is recorded as ``diverged_at`` (the paper's trig features NaN).
    ``model`` continues from given weights instead of building one (transfer).
    ``time_limit`` (training seconds) stops the run early, with a final evaluation.
    ``logit_bias`` (vocab_size,) starts a new model's logit bias (``size.output_bias``), e.g.
    at the training tokens' log frequencies (``task.log_frequencies()``), so that the first
    steps need not learn the unigram model.
    """
    torch.manual_seed(seed)
    if model is None:
        model = build_model(variant, size, vocab_size=task.vocab_size, causal=task.causal, seed=seed)
        if logit_bias is not None:
            if getattr(model, "logit_bias", None) is None:
                raise ValueError(
                    f"logit_bias needs a model with a logit bias (ModelSize.output_bias); {variant.name!r} has none"
                )
            with torch.no_grad():
                model.logit_bias.copy_(logit_bias.to(model.logit_bias))
    elif logit_bias is not None:
        raise ValueError("logit_bias starts a new model; a given model keeps its own")
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=lr
    )
    redrawer = FeatureRedrawer(model, redraw_interval if variant.redraw else 0, seed)
    curve = [{"step": 0, "time": 0.0, "cpu_time": 0.0, "train_loss": None, **task.evaluate(model), **far_gains(model)}]
    clock, cpu, diverged, last_loss, counted = 0.0, 0.0, None, float("nan"), 0
    for step in range(1, steps + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, step / warmup) if warmup else lr
        loss = task.loss(model, task.batch(step, seed))
        if not torch.isfinite(loss):
            diverged = step
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        redrawer.step(step)
        clock += time.perf_counter() - t0
        cpu += time.process_time() - c0
        last_loss = loss.item()
        out_of_time = time_limit is not None and clock >= time_limit
        if step % eval_every == 0 or step == steps or out_of_time:
            ev = task.evaluate(model)
            point = {"step": step, "time": clock, "cpu_time": cpu, "train_loss": last_loss}
            curve.append({**point, **ev, **far_gains(model)})
            if not math.isfinite(ev["loss"]):
                diverged = step
                break
        if progress is not None:
            progress(1)
            counted += 1
        if out_of_time:
            break
    if progress is not None and counted < steps:
        progress(steps - counted)
    done = curve[-1]["step"]
    return {
        "variant": asdict(variant),
        "seed": seed,
        "curve": curve,
        "diverged_at": diverged,
        "sec_per_step": clock / max(1, done),
        "params": sum(p.numel() for p in model.parameters()),
        "model": model,
    }


def far_gains(model) -> dict[str, Any]:
    """{"far_log_gain": per layer, per head} for a hybrid with learnable far gains (so a
    curve shows where training takes them); {} for every other model."""
    gains = [p.detach().tolist() for n, p in model.named_parameters() if n.endswith("far_log_gain")]
    return {"far_log_gain": gains} if gains else {}


def at_time(curve: list[dict[str, Any]], t: float, *, clock: str = "time") -> dict[str, Any]:
    """The last evaluation at training wall time <= t (``clock="cpu_time"``: CPU time)."""
    best = curve[0]
    for point in curve:
        if point[clock] <= t + 1e-9:
            best = point
    return best


def compare(runs: list[dict[str, Any]], *, metric: str = "accuracy") -> dict[str, Any]:
    """Per variant, mean over seeds of ``metric`` (and loss) at the last common step and at
    the largest training time every run reached; also each variant's seconds per step."""
    live = [r for r in runs if r["diverged_at"] is None]
    common_step = min((r["curve"][-1]["step"] for r in live), default=0)
    common_time = min((r["curve"][-1]["time"] for r in live), default=0.0)
    out: dict[str, Any] = {"step": common_step, "time": common_time, "variants": {}}
    names = list(dict.fromkeys(r["variant"]["name"] for r in runs))
    for name in names:
        mine = [r for r in runs if r["variant"]["name"] == name]
        row: dict[str, Any] = {"seeds": len(mine), "diverged": [r["seed"] for r in mine if r["diverged_at"]]}
        ok = [r for r in mine if r["diverged_at"] is None]
        if ok:
            at_step = [next(p for p in r["curve"] if p["step"] == common_step) for r in ok]
            at_t = [at_time(r["curve"], common_time) for r in ok]
            for tag, pts in (("step", at_step), ("time", at_t)):
                row[f"{metric}@{tag}"] = sum(p[metric] for p in pts) / len(pts)
                row[f"loss@{tag}"] = sum(p["loss"] for p in pts) / len(pts)
                row[f"{metric}@{tag}_per_seed"] = [p[metric] for p in pts]
            row["steps@time"] = sum(p["step"] for p in at_t) / len(at_t)
            row["sec_per_step"] = sum(r["sec_per_step"] for r in ok) / len(ok)
        out["variants"][name] = row
    return out


def plot_curves(runs: list[dict[str, Any]], path, *, metric: str = "accuracy", title: str = "", extra=None) -> None:
    """Two panels, ``metric`` against step and against training seconds; one colour per
    variant, one line per seed. ``extra`` = (rows, draw(fig, gridspec)) adds a lower part of
    ``rows`` height units (curves take 4) for sample images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = extra[0] if extra else 0
    fig = plt.figure(figsize=(12, 4.5 + 1.1 * rows))
    grid = fig.add_gridspec(4 + rows, 2)
    axes = [fig.add_subplot(grid[:4, 0]), fig.add_subplot(grid[:4, 1])]
    draw_curves(runs, axes, metric=metric)
    fig.suptitle(title, fontsize=10)
    if extra:
        extra[1](fig, grid[4:, :])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_curves(runs: list[dict[str, Any]], axes, *, metric: str) -> None:
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["variant"]["name"] for r in runs))
    colours = {n: plt.cm.tab10(i % 10) for i, n in enumerate(names)}
    for r in runs:
        name = r["variant"]["name"]
        pts = [p for p in r["curve"] if math.isfinite(p[metric])]
        label = name if r["seed"] == min(q["seed"] for q in runs if q["variant"]["name"] == name) else None
        if r["diverged_at"] and label:
            label += f" (NaN at step {r['diverged_at']})"
        style = "--" if r["diverged_at"] else "-"
        for ax, key in zip(axes, ("step", "time"), strict=True):
            ax.plot([p[key] for p in pts], [p[metric] for p in pts], style, color=colours[name], label=label, lw=1.2)
    axes[0].set_xlabel("training step")
    axes[1].set_xlabel("training wall time (s, evaluation excluded)")
    for ax in axes:
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
