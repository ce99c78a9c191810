"""The demo's language-model part: the hybrid Performer vs exact softmax at a long context,
same wall clock.

Two causal byte-level LMs with identical parameters (same seed, same initial weights) train
on English text (the King James Bible's Genesis, Proverbs and Matthew, shipped in
favor.data.kjv) with sequences of ``context`` bytes (default 8192), each for the same share
of ``seconds`` of wall-clock time, on the same batches in the same order, each with a full
warm-up + cosine schedule sized to the steps it can take in that time. The Performer is the
hybrid one: FAVOR+ plus exact softmax weights for each byte's last 64 + 1 bytes and the first
4 (``favor.ExactTerms(64, sinks=4)``; plain FAVOR+ does not leave the unigram plateau at this
size, docs/paper.md). At a long context softmax attention costs O(L^2) per sequence and the
hybrid O(L (M + W)), so the hybrid takes more steps and sees more tokens in the same time:
the comparison is quality per wall-clock second. Then: held-out bits per byte (Psalms, Luke,
Acts) on the same windows next to the byte-frequency (unigram) baseline, training tokens/s,
the peak memory of one training step (in a fresh process), and decoding cost per token after
1k to 16k tokens of context (the hybrid keeps FAVOR's constant-size state and a ring of its
last 65 keys; softmax's key/value cache grows with the context).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import multiprocessing
import resource
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data.text import load_tokenizer
from ..models import PerformerConfig, PerformerLM
from ..nn import feature_maps
from ..nn.attention import AttentionState
from ..ops.local.spec import ExactTerms
from .loop import LN2, _read_log, load_data, resolve_config, train

__all__ = [
    "lm_demo",
    "decode_ms_per_token",
    "probe_train_step",
    "DEMO_MODEL",
    "DEMO_TRAIN",
    "DEMO_CONTEXT",
    "DEMO_EXACT",
    "demo_text",
]

log = logging.getLogger(__name__)

DEMO_MODEL = {"dim": 64, "depth": 2, "heads": 2, "chunk_size": 64}
#: lr 5e-3, not 3e-3: with the ~10-30 steps the budget allows here, 3e-3 left the English byte
#: LM far above the byte frequencies (5.76 bits/byte after 11 steps; 1e-2: 4.49; 5e-3: 4.31
#: after 25 steps, where 1e-2 gave 4.43)
DEMO_TRAIN = {"batch_size": 1, "lr": 5e-3, "eval_windows": 4, "log_every": 1}
DEMO_CONTEXT = 8192
#: the hybrid Performer's exact terms (the window and sinks of favor paper's hybrid variant)
DEMO_EXACT = ExactTerms(64, sinks=4)
#: the prompt of the sample the hybrid model writes
PROMPT = "And the LORD said unto"


def demo_text() -> tuple[str, str]:
    """(training file, held-out file): the King James Bible extracts favor.data.kjv ships."""
    from importlib import resources

    root = resources.files("favor.data")
    return str(root.joinpath("kjv_train.txt.gz")), str(root.joinpath("kjv_heldout.txt.gz"))


CONTEXTS = (1024, 4096, 16384)
#: share of ``seconds`` each model trains for (the rest: probes, evaluation, decoding)
TRAIN_SHARE = 0.3


def _train_step(model: PerformerLM, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    loss = F.cross_entropy(model(x).flatten(0, 1), x.flatten())
    opt.zero_grad()
    loss.backward()
    opt.step()


def _probe(config: dict, context: int, threads: int) -> tuple[float, float]:
    """In a fresh process: (peak MiB of one training step at ``context`` above the memory
    held before it, seconds of a second step). A short step first, so that one-time library
    workspaces are not counted."""
    torch.set_num_threads(threads)
    cfg = PerformerConfig.from_dict(config)
    model = PerformerLM(cfg)
    opt = torch.optim.AdamW(model.parameters())
    g = torch.Generator().manual_seed(0)
    _train_step(model, opt, torch.randint(0, cfg.vocab_size, (1, 64), generator=g))
    x = torch.randint(0, cfg.vocab_size, (1, context), generator=g)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _train_step(model, opt, x)
    peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # Linux: KiB
    t = time.perf_counter()
    _train_step(model, opt, x)
    return peak_mib, time.perf_counter() - t


def probe_train_step(config: PerformerConfig, context: int) -> tuple[float, float]:
    """(peak MiB, seconds) of one training step of a fresh ``PerformerLM(config)`` on one
    sequence of ``context`` tokens, measured in a fresh process (peak resident memory is a
    per-process high-water mark)."""
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_probe, (config.to_dict(), context, torch.get_num_threads()))


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
    for name in ("hybrid", "softmax"):
        rows = _read_log(out / name / "log.jsonl")
        ax.plot([r["time"] for r in rows], [r["loss"] / LN2 for r in rows], alpha=0.7, label=f"{name}: train")
    for name, marker in (("hybrid", "o"), ("softmax", "s")):
        r = results["runs"][name]
        ax.plot([r["seconds"]], [r["val_bpr"]], marker, color="black", label=f"{name}: held out, end")
    ax.axhline(results["unigram_bpr"], color="gray", ls="--", lw=0.8, label="byte frequencies (no context)")
    ax.set_xlabel("wall-clock seconds of training")
    ax.set_ylabel("bits per byte")
    ax.set_title(f"Causal byte LM (English) at context {results['context']}: same size, same time budget")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "lm_loss.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    ctx = [int(c) for c in results["decode_ms_per_token"]]
    ax.plot(ctx, list(results["decode_ms_per_token"].values()), "o-", label="hybrid (FAVOR state + ring)")
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


def lm_demo(
    out_dir: str | Path,
    *,
    seconds: float = 90.0,
    context: int = DEMO_CONTEXT,
    seed: int = 0,
    threads: int | None = None,
) -> dict[str, Any]:
    """Train a hybrid Performer LM (FAVOR+ with ``DEMO_EXACT``) and a same-size softmax LM
    on English bytes at ``context`` bytes per sequence, each for ``TRAIN_SHARE * seconds``
    of wall clock; about ``seconds`` in all.

    Returns {"context", "runs": {name: {"steps", "seconds", "tokens", "tokens_per_s",
    "val_bpr" (held-out bits per byte), "step_seconds", "peak_mib"}}, "unigram_bpr",
    "decode_ms_per_token" (hybrid), "softmax_decode_ms_per_token", "decode_state_kib"
    (float32 state / cache sizes), "sample", "config", "threads", "plots", "seconds"};
    writes both runs (log.jsonl, checkpoints) under out_dir/hybrid and out_dir/softmax,
    lm_loss.png, lm_decode.png and lm_demo.json. ``threads`` sets torch's CPU threads for
    the duration (restored afterwards).
    """
    if not (isinstance(seconds, (int, float)) and seconds > 0):
        raise ValueError(f"seconds must be > 0, got {seconds!r}")
    if isinstance(context, bool) or not isinstance(context, int) or context < 16:
        raise ValueError(f"context must be an int >= 16, got {context!r}")
    if threads is None:
        return _lm_demo(out_dir, seconds=seconds, context=context, seed=seed)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _lm_demo(out_dir, seconds=seconds, context=context, seed=seed)
    finally:
        torch.set_num_threads(before)


def _lm_demo(out_dir: str | Path, *, seconds: float, context: int, seed: int) -> dict[str, Any]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    data, heldout = demo_text()
    base_model, _ = resolve_config(preset="tiny", seed=seed, data=data, **DEMO_MODEL)
    base_model = base_model.replace(max_len=max(base_model.max_len, context, max(CONTEXTS)))
    cfgs = {"hybrid": base_model.replace(exact=DEMO_EXACT), "softmax": base_model.replace(attention="softmax")}
    # memory and step time of each, in fresh processes; the steps fill the time budget
    probes = {name: probe_train_step(cfg, context) for name, cfg in cfgs.items()}
    budget = TRAIN_SHARE * seconds
    runs = {}
    for name, cfg in cfgs.items():
        # 3x the steps the probe predicts, cut by the time cap: the fresh-process probe
        # overestimated the hybrid's step 2-2.4x, which ended its run at half its budget
        steps = max(4, math.ceil(3 * budget / max(probes[name][1], 1e-6)))
        _, train_cfg = resolve_config(
            preset="tiny",
            seed=seed,
            data=data,
            eval_data=heldout,
            seq_len=context,
            steps=steps,
            warmup=max(1, steps // 10),
            eval_every=steps,
            checkpoint_every=steps,
            **DEMO_TRAIN,
        )
        # a busy machine can be slower than the probe: the time cap keeps the budgets equal
        r = train(out / name, cfg, train_cfg, time_limit=budget, write_plot=False)
        runs[name] = {
            "steps": r["steps"],
            "seconds": r["seconds"],
            "tokens": r["steps"] * train_cfg.batch_size * context,
            "tokens_per_s": r["tokens_per_s"],
            "val_bpr": r["val_bpr"],
            "step_seconds": probes[name][1],
            "peak_mib": probes[name][0],
            "model": r["model"].eval(),
        }
    tokens = load_data(train_cfg).heldout.tokens
    decode, soft_decode = {}, {}
    for n in CONTEXTS:
        ctx = tokens[:n][None]
        if ctx.shape[1] < n:  # the held-out text is ~1 MB; repeat it if ever shorter
            ctx = tokens.repeat(n // len(tokens) + 1)[:n][None]
        decode[str(n)] = decode_ms_per_token(runs["hybrid"]["model"], ctx)
        soft_decode[str(n)] = decode_ms_per_token(runs["softmax"]["model"], ctx, synthetic_cache=n > 4096)
    tok = load_tokenizer(None)
    prompt = torch.as_tensor(tok.encode(PROMPT), dtype=torch.long)[None]
    gen = runs["hybrid"]["model"].generate(prompt, 120, generator=torch.Generator().manual_seed(seed))[0]
    sample = tok.decode(gen.tolist())
    m_out = feature_maps(runs["hybrid"]["model"])[0].num_outputs  # M' features per head
    c, e = base_model, DEMO_EXACT
    cache_kib = {
        # hybrid: per layer and head FAVOR's (M', Dv) state, an M' normaliser and a log
        # scale, and the exact terms' keys and values: the sinks and a ring of C + W
        "hybrid": c.depth
        * c.heads
        * ((m_out * c.head_dim + m_out + 1) + (e.sinks + e.ring()) * 2 * c.head_dim)
        * 4
        / 1024,
        # softmax: keys and values of every past token, per layer and head
        "softmax": {str(n): c.depth * c.heads * 2 * n * c.head_dim * 4 / 1024 for n in CONTEXTS},
    }
    for r in runs.values():
        del r["model"]
    results = {
        "context": context,
        "runs": runs,
        "unigram_bpr": _unigram_bpr(train_cfg),
        "decode_ms_per_token": decode,
        "softmax_decode_ms_per_token": soft_decode,
        "decode_state_kib": cache_kib,
        "softmax_16k_cache": "synthetic (random keys/values of the right size; cost depends only on size)",
        "sample": sample,
        "config": {"model": dataclasses.asdict(base_model), "train": dataclasses.asdict(train_cfg)},
        "threads": torch.get_num_threads(),
    }
    results["plots"] = _plot(out, results)
    results["seconds"] = time.perf_counter() - t_start
    (out / "lm_demo.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


def _unigram_bpr(cfg) -> float:
    """Bits per token (byte), on the held-out windows the models are scored on, of token
    frequencies counted on the training text (add-one): what a model that ignores context
    scores."""
    data = load_data(cfg)
    counts = torch.bincount(data.train.tokens, minlength=data.vocab_size).double()
    p = (counts + 1) / (counts + 1).sum()
    _, y = data.heldout_windows(cfg.seq_len, cfg.eval_windows, seed=cfg.seed)
    y = y[data.counted(y)]
    return float(-p.log2()[y].mean())
