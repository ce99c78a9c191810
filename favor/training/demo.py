"""The demo's language-model part: FAVOR vs exact softmax on the embedded proteins.

Two causal LMs with identical parameters (same seed, same initial weights) are trained on
the same batches with the same schedule for the same number of steps, chosen so that both
runs together take about ``seconds``; then validation bits per residue, training
throughput, and decoding cost per token at 1k and 16k context are measured.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data import ProteinTokenizer, TokenStream, load_proteins, split
from ..models import PerformerConfig, PerformerLM
from ..nn.attention import AttentionState
from .loop import LN2, _read_log, resolve_config, train

__all__ = ["lm_demo", "decode_ms_per_token", "DEMO_MODEL", "DEMO_TRAIN"]

log = logging.getLogger(__name__)

DEMO_MODEL = {"dim": 64, "depth": 2, "heads": 2, "chunk_size": 64}
DEMO_TRAIN = {"batch_size": 8, "seq_len": 256, "lr": 3e-3, "warmup": 10, "eval_windows": 32, "log_every": 1}
CONTEXTS = (1024, 4096, 16384)


def _step_seconds(model_cfg: PerformerConfig, batch_size: int, seq_len: int, reps: int = 3) -> float:
    """Median wall time of one training step (forward, backward, AdamW) on random tokens."""
    model = PerformerLM(model_cfg)
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randint(0, model_cfg.vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(reps + 1):
        t = time.perf_counter()
        loss = F.cross_entropy(model(x).flatten(0, 1), x.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return sorted(times[1:])[len(times[1:]) // 2]


@torch.no_grad()
def decode_ms_per_token(
    model: PerformerLM, context: torch.Tensor, *, tokens: int = 32, synthetic_cache: bool = False
) -> float:
    """Median milliseconds for one recurrent decoding step after ``context`` (1, n).

    FAVOR runs the real prefill (linear in n). ``synthetic_cache=True`` (the softmax
    baseline at long contexts) fills each layer's key/value cache with random tensors of the
    right size instead: a softmax step's cost depends only on the cache size, and an exact
    16k prefill would take most of the demo's time.
    """
    model.eval()
    n = context.shape[1]
    if synthetic_cache:
        cfg = model.config
        g = torch.Generator().manual_seed(0)
        shape = (1, cfg.heads, n, cfg.head_dim)
        state = [
            AttentionState(n, keys=torch.randn(shape, generator=g), values=torch.randn(shape, generator=g))
            for _ in range(cfg.depth)
        ]
    else:
        _, state = model(context, return_state=True)
    tok = context[:, -1:]
    times = []
    for _ in range(tokens):
        t = time.perf_counter()
        logits, state = model(tok, state=state)
        times.append(time.perf_counter() - t)
        tok = logits[:, -1].argmax(-1, keepdim=True)
    return 1000.0 * sorted(times)[len(times) // 2]


def _plot(out: Path, results: dict[str, Any]) -> list[str]:
    try:
        import matplotlib
    except ImportError:
        log.warning("matplotlib is not installed: no demo plots")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in ("favor", "softmax"):
        rows = _read_log(out / name / "log.jsonl")
        line = ax.plot([r["step"] for r in rows], [r["loss"] / LN2 for r in rows], alpha=0.5, label=f"{name} train")
        val = [(r["step"], r["val_bpr"]) for r in rows if "val_bpr" in r]
        ax.plot(*zip(*val, strict=True), "o-", color=line[0].get_color(), label=f"{name} validation (bits/residue)")
    ax.axhline(math.log2(20), color="gray", ls=":", label="uniform over 20 residues")
    ax.axhline(results["unigram_bpr"], color="black", ls="--", lw=0.8, label="residue frequencies (no context)")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per token / residue")
    ax.set_title("Causal protein LM, same size and steps: FAVOR+ vs exact softmax")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "lm_loss.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    ctx = [int(c) for c in results["decode_ms_per_token"]]
    ax.plot(ctx, list(results["decode_ms_per_token"].values()), "o-", label="favor (recurrent state)")
    ax.plot(ctx, list(results["softmax_decode_ms_per_token"].values()), "s--", label="softmax (KV cache)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("ms per generated token")
    ax.set_title("Decoding cost vs context")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "lm_decode.png", dpi=110)
    plt.close(fig)
    return ["lm_loss.png", "lm_decode.png"]


def lm_demo(out_dir: str | Path, *, seconds: float = 60.0, seed: int = 0, threads: int | None = None) -> dict[str, Any]:
    """Train a FAVOR+ LM and a same-size softmax LM for about ``seconds`` in total.

    Returns {"favor_bpr", "softmax_bpr", "steps", "tokens_per_s": {favor, softmax},
    "sample", "decode_ms_per_token": {"1024", "4096", "16384"} (favor), "unigram_bpr" (context-free baseline),
    "softmax_decode_ms_per_token": {...}, "config", "plots"}; writes the two runs
    (log.jsonl, checkpoints) under out_dir/favor and out_dir/softmax, lm_loss.png,
    lm_decode.png and lm_demo.json. ``threads`` sets torch's CPU threads for the duration
    (restored afterwards); on a machine shared with other jobs, 1 avoids thread contention.
    """
    if threads is None:
        return _lm_demo(out_dir, seconds=seconds, seed=seed)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _lm_demo(out_dir, seconds=seconds, seed=seed)
    finally:
        torch.set_num_threads(before)


def _lm_demo(out_dir: str | Path, *, seconds: float, seed: int) -> dict[str, Any]:
    if not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    base_model, _ = resolve_config(preset="tiny", seed=seed, **DEMO_MODEL)
    cfgs = {"favor": base_model, "softmax": base_model.replace(attention="softmax")}
    bs, sl = DEMO_TRAIN["batch_size"], DEMO_TRAIN["seq_len"]
    per_step = {k: _step_seconds(c, bs, sl) for k, c in cfgs.items()}
    # about a fifth of the time goes to setup, evaluation, decoding timings and plots
    budget = 0.8 * seconds - (time.perf_counter() - t_start)
    steps = max(10, int(budget / sum(per_step.values())))
    eval_every = max(1, steps // 5)
    _, train_cfg = resolve_config(
        preset="tiny", seed=seed, steps=steps, eval_every=eval_every, checkpoint_every=steps, **DEMO_TRAIN
    )
    # FAVOR trains first under a time cap (a loaded machine can be slower than the estimate);
    # softmax then stops at the same step, so both see the same batches and schedule
    runs = {
        "favor": train(
            out / "favor",
            cfgs["favor"],
            train_cfg,
            time_limit=budget * per_step["favor"] / sum(per_step.values()),
            write_plot=False,
        )
    }
    done = runs["favor"]["steps"]
    runs["softmax"] = train(out / "softmax", cfgs["softmax"], train_cfg, stop_at=done, write_plot=False)
    favor_model = runs["favor"]["model"].eval()
    softmax_model = runs["softmax"]["model"].eval()

    tok = ProteinTokenizer()
    _, val = split(load_proteins(), val_fraction=train_cfg.val_fraction, seed=seed)
    stream = TokenStream(val, tok)
    decode, soft_decode = {}, {}
    for n in CONTEXTS:
        ctx = stream.tokens[:n][None]
        if ctx.shape[1] < n:  # the validation stream is ~150k tokens; repeat it if ever shorter
            ctx = stream.tokens.repeat(n // len(stream) + 1)[:n][None]
        decode[str(n)] = decode_ms_per_token(favor_model, ctx)
        soft_decode[str(n)] = decode_ms_per_token(softmax_model, ctx, synthetic_cache=n > 4096)
    prompt = tok.encode("M", bos=True)[None]
    gen = favor_model.generate(prompt, 200, generator=torch.Generator().manual_seed(seed))[0, 1:]
    ends = (gen == tok.eos_id).nonzero()
    sample = tok.decode(gen[: int(ends[0])] if len(ends) else gen)
    results = {
        "favor_bpr": runs["favor"]["val_bpr"],
        "softmax_bpr": runs["softmax"]["val_bpr"],
        "steps": done,
        "tokens_per_s": {k: r["tokens_per_s"] for k, r in runs.items()},
        "train_seconds": {k: r["seconds"] for k, r in runs.items()},
        "sample": sample,
        "decode_ms_per_token": decode,
        "softmax_decode_ms_per_token": soft_decode,
        "softmax_16k_cache": "synthetic (random keys/values of the right size; cost depends only on size)",
        "unigram_bpr": _unigram_bpr(train_cfg),
        "config": {"model": dataclasses.asdict(base_model), "train": dataclasses.asdict(train_cfg)},
        "threads": torch.get_num_threads(),
    }
    results["plots"] = _plot(out, results)
    results["seconds"] = time.perf_counter() - t_start
    (out / "lm_demo.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


def _unigram_bpr(cfg) -> float:
    """Bits per residue, on the validation windows the models are scored on, of residue
    frequencies counted on the training split: what a model that ignores context scores."""
    tok = ProteinTokenizer()
    train_recs, val_recs = split(load_proteins(cfg.data), val_fraction=cfg.val_fraction, seed=cfg.seed)
    counts = torch.bincount(TokenStream(train_recs, tok).tokens, minlength=tok.vocab_size).double()
    p = (counts + 1) / (counts + 1).sum()
    _, y = TokenStream(val_recs, tok).windows(cfg.seq_len, cfg.eval_windows)
    y = y[tok.is_residue(y)]
    return float(-p.log2()[y].mean())
