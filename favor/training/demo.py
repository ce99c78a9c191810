"""favor demo: what favor is, as tables with units and a one-line caption each (2-3 minutes
on 2 cores); ``run_demo`` is the whole demo, ``lm_demo`` its language-model part.

(a) approximation: each kernel vs exact softmax attention, M in {64, 256, 1024}, two logit
    scales, next to the uniform-attention baseline (favor.benchmarking.approximation);
(b) speed and memory: favor bidirectional and causal vs scaled_dot_product_attention
    (favor.benchmarking.timing);
(c) a byte-level English language model at a long context: the hybrid Performer (FAVOR+
    with an exact 64-byte window and 4 sinks) vs softmax of the same size, the same
    wall-clock budget each (quality per second against the byte-frequency baseline, memory);
(d) decoding cost per token after 1k-16k tokens of context, from the models of (c).

The language-model part (``lm_demo``): two causal byte-level LMs with identical parameters (same seed, same initial weights) train
on English text (the King James Bible's Genesis, Proverbs and Matthew, shipped in
favor.data.kjv) with sequences of ``context`` bytes (default 8192), each for the same share
of ``seconds`` of wall-clock time, on the same batches in the same order, with the same
schedule (5 warm-up steps, then a constant learning rate: the time cap, not a step count,
ends the run). Both start their logit bias at the training bytes' log frequencies, so step 0
already scores about the byte-frequency baseline and every update goes to what the context
adds. The Performer is the
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
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..benchmarking import approximation
from ..benchmarking.tables import format_table
from ..benchmarking.timing import speed_table
from ..data.text import load_tokenizer
from ..models import PerformerConfig, PerformerLM
from ..nn import feature_maps
from ..nn.attention import AttentionState
from ..ops.local.spec import ExactTerms
from .loop import LN2, load_data, read_log, resolve_config, token_log_frequencies, train

__all__ = [
    "run_demo",
    "demo_speed_table",
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

#: M = 64 (2D) features, as the ``text`` preset: beside the exact window they only estimate
#: the far keys; the hybrid's step at 8192 then takes ~0.4 s instead of ~0.5 s (M = 111, the
#: default). ``output_bias``: a logit bias, started at the byte frequencies (DEMO_TRAIN)
DEMO_MODEL = {"dim": 64, "depth": 2, "heads": 2, "chunk_size": 64, "num_features": 64, "output_bias": True}
#: sized for the ~20-60 steps of 8192 bytes the budget allows (docs/benchmarks.md, "The demo's
#: language models"): the unigram-started bias saves the ~15 steps a bias-free model spends
#: reaching the byte frequencies (3.54 vs 3.74 bits/byte after 50-55 hybrid steps); after 5
#: warm-up steps a constant lr of 1e-2 (5e-3: about as good; 2e-2: 3.94, unstable) beats a
#: cosine decay sized to the steps, which spends the few steps at a lower rate
DEMO_TRAIN = {
    "batch_size": 1,
    "lr": 1e-2,
    "warmup": 5,
    "min_lr_ratio": 1.0,
    "output_bias_init": "unigram",
    "eval_windows": 4,
    "log_every": 1,
}
DEMO_CONTEXT = 8192
#: the hybrid Performer's exact terms (the window and sinks of favor paper's hybrid variant)
DEMO_EXACT = ExactTerms(64, sinks=4)
#: the prompt of the sample the hybrid model writes
PROMPT = "And the LORD said unto"


def demo_text() -> tuple[str, str]:
    """(training file, held-out file): the King James Bible extracts favor.data.kjv ships."""

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
        rows = read_log(out / name / "log.jsonl")
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
        # a cap that the time limit reaches first (3x the steps the probe predicts: the
        # fresh-process probe has been 2-2.4x off); the lr is constant after the warm-up,
        # so where the time cap ends the run does not change the schedule
        steps = max(4, math.ceil(3 * budget / max(probes[name][1], 1e-6)))
        _, train_cfg = resolve_config(
            preset="tiny",
            seed=seed,
            data=data,
            eval_data=heldout,
            seq_len=context,
            steps=steps,
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
    log_p = token_log_frequencies(data.train.tokens, data.vocab_size)  # the models' initial bias
    _, y = data.heldout_windows(cfg.seq_len, cfg.eval_windows, seed=cfg.seed)
    y = y[data.counted(y)]
    return float(-log_p[y].mean() / LN2)


def _sig(x: float | None, digits: int = 3) -> str:
    """``digits`` significant digits, no exponent for the magnitudes the demo prints."""
    if x is None:
        return "-"
    if x == 0 or not math.isfinite(x):
        return str(x)
    decimals = max(0, digits - 1 - int(math.floor(math.log10(abs(x)))))
    return f"{x:.{decimals}f}"


def _plot_approximation(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = sorted({r["logit_std"] for r in rows})
    fig, axes = plt.subplots(1, len(scales), figsize=(5 * len(scales), 4), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, s in zip(axes, scales, strict=True):
        sub = [r for r in rows if r["logit_std"] == s]
        for kernel in dict.fromkeys(r["kernel"] for r in sub):
            pts = [(r["num_features"], r["rel_error"]) for r in sub if r["kernel"] == kernel and r["num_features"]]
            if pts:
                ax.loglog(*zip(*pts, strict=True), marker="o", label=kernel)
        ax.axhline(sub[0]["uniform_baseline"], color="gray", ls="--", label="uniform attention")
        ms = sorted({r["num_features"] for r in sub if r["num_features"]})
        ref = [sub[0]["rel_error"] * (ms[0] / m) ** 0.5 for m in ms]
        ax.loglog(ms, ref, color="black", ls=":", label="M^-1/2")
        ax.set_title(f"logit std {s}")
        ax.set_xlabel("random features M")
    axes[0].set_ylabel("|out - exact| / |exact|")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _approximation(out: Path, echo: Callable[[str], None]) -> list[dict]:
    rows = approximation.approximation_table()
    trig = [r for r in rows if r["kernel"] == "trig"]
    worst_trig = max(trig, key=lambda r: r["rel_error"]) if trig else None
    _table(
        echo,
        "(a) approximation of exact softmax attention (L=1024, D=64, H=4, float32, seed 0)",
        ["logit std", "kernel", "M", "rel. error", "uniform attention"],
        [
            [r["logit_std"], r["kernel"], r["num_features"] or "-", _sig(r["rel_error"]), _sig(r["uniform_baseline"])]
            for r in rows
        ],
        caption=(
            "|out - exact| / |exact| next to uniform attention's error: the softmax estimators' error falls as "
            "M^-1/2 and grows with the logit scale"
            + (
                f"; trig (not positive) reaches {_sig(worst_trig['rel_error'])} at logit std {worst_trig['logit_std']}, "
                f"M={worst_trig['num_features']}"
                if worst_trig
                else ""
            )
            + ". relu and elu are other kernels, not estimates of softmax."
        ),
    )
    _plot_approximation(rows, out / "approximation.png")
    return rows


def _plot_speed(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    series = [
        ("favor_fwd", "favor bidirectional fwd", "C0", "-"),
        ("sdpa_fwd", "SDPA fwd", "C0", "--"),
        ("favor_causal_fwdbwd", "favor causal fwd+bwd", "C3", "-"),
        ("sdpa_causal_fwdbwd", "SDPA causal fwd+bwd", "C3", "--"),
    ]
    for key, label, color, ls in series:
        for ax, unit in ((ax_t, "ms"), (ax_m, "mib")):
            pts = [(r["L"], r.get(f"{key}_{unit}")) for r in rows if r.get(f"{key}_{unit}") is not None]
            if pts:
                ax.loglog(*zip(*pts, strict=True), marker="o", color=color, ls=ls, label=label)
    ax_t.set(xlabel="sequence length L", ylabel="time (ms)", title="time (B=1, H=8, D=64, M=256)")
    ax_m.set(xlabel="sequence length L", ylabel="peak memory above baseline (MiB)", title="peak memory")
    ax_t.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _speed(out: Path, lengths: list[int], echo: Callable[[str], None]) -> list[dict]:
    rows = demo_speed_table(lengths, out=out, echo=echo)
    _plot_speed(rows, out / "speed.png")
    return rows


def _language_model(out: Path, seconds: float, context: int, echo: Callable[[str], None]) -> dict:
    res = lm_demo(out / "lm", seconds=seconds, context=context)
    f, s = res["runs"]["hybrid"], res["runs"]["softmax"]
    _table(
        echo,
        f"(c) English byte language model at context {context}: hybrid Performer (FAVOR+ "
        f"with M={DEMO_MODEL['num_features']}, exact window 64, "
        f"4 sinks) vs exact softmax, same size, a {TRAIN_SHARE * seconds:.0f} s training budget each "
        f"({res['threads']} threads)",
        ["attention", "train s", "steps", "tokens seen", "train tokens/s", "held-out bits/byte", "peak step MiB"],
        [
            [
                name,
                f"{r['seconds']:.1f}",
                r["steps"],
                f"{r['tokens'] / 1e3:.0f}k",
                f"{r['tokens_per_s'] / 1e3:.1f}k",
                f"{r['val_bpr']:.3f}",
                f"{r['peak_mib']:.0f}",
            ]
            for name, r in (("hybrid", f), ("softmax", s))
        ]
        + [["byte frequencies", "-", "-", "-", "-", f"{res['unigram_bpr']:.3f}", "-"]],
        caption=(
            f"at {context} bytes the hybrid trains at {f['tokens_per_s'] / s['tokens_per_s']:.1f}x softmax's "
            f"tokens/s, so in the same wall clock it sees {f['tokens'] / max(s['tokens'], 1):.1f}x the tokens and ends "
            f"{abs(s['val_bpr'] - f['val_bpr']):.3f} bits/byte {'below' if f['val_bpr'] < s['val_bpr'] else 'above'} "
            f"softmax and {abs(res['unigram_bpr'] - f['val_bpr']):.2f} "
            f"{'below' if f['val_bpr'] < res['unigram_bpr'] else 'above'} the byte frequencies (lower is better); "
            f"peak memory of one "
            f"training step: {f['peak_mib']:.0f} vs {s['peak_mib']:.0f} MiB (torch's CPU SDPA is memory-lean)."
        ),
    )
    ctx = list(res["decode_ms_per_token"])
    fav, soft = res["decode_ms_per_token"], res["softmax_decode_ms_per_token"]
    kib = res["decode_state_kib"]
    _table(
        echo,
        "(d) decoding after a context of n tokens: time per generated token and the state kept (models of (c))",
        [
            "context n",
            "hybrid ms/token",
            "softmax ms/token",
            "softmax / hybrid",
            "hybrid state KiB",
            "softmax KV cache KiB",
        ],
        [
            [
                n,
                f"{fav[n]:.2f}",
                f"{soft[n]:.2f}",
                f"{soft[n] / fav[n]:.1f}x",
                f"{kib['hybrid']:.0f}",
                f"{kib['softmax'][n]:.0f}",
            ]
            for n in ctx
        ],
        caption=(
            f"the hybrid's state (FAVOR's and a ring of 65 keys) is constant-size: {fav[ctx[-1]] / fav[ctx[0]]:.2f}x the cost at n={ctx[-1]} vs n={ctx[0]}; "
            f"softmax's key/value cache grows with n ({soft[ctx[-1]] / soft[ctx[0]]:.1f}x; its {ctx[-1]} cache is "
            "random keys/values of the right size)."
        ),
    )
    # a model's bytes may be anything: printed as one line of letters, digits and prose punctuation
    text = " ".join("".join(ch if ch.isalnum() or ch in " .,;:!?'-()" else " " for ch in res["sample"]).split())
    echo(f"  sampled text (hybrid model, seed 0): {text[:100]}{'...' if len(text) > 100 else ''}")
    return res


def _silent(_: str) -> None:
    """The default ``echo``: library code never prints; the command passes ``print``."""


def demo_speed_table(lengths, *, out: Path | None = None, echo: Callable[[str], None] = _silent) -> list[dict]:
    """The speed section of ``favor demo``: favor vs SDPA at a few lengths (~40 s)."""
    rows = speed_table(tuple(lengths), quick=True)

    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    last = rows[-1] if rows else {}
    both = [r for r in rows if r.get("favor_causal_fwdbwd_mib") is not None and r.get("sdpa_causal_fwdbwd_mib")]
    mem = (
        f"; peak MiB of causal forward+backward at L={both[-1]['L']}: favor {both[-1]['favor_causal_fwdbwd_mib']:.0f}, "
        f"SDPA {both[-1]['sdpa_causal_fwdbwd_mib']:.0f}"
        if both
        else ""
    )
    _table(
        echo,
        "(b) speed and peak memory vs exact attention (scaled_dot_product_attention), B=1 H=8 D=64 M=256 float32",
        [
            "L",
            "favor fwd ms",
            "SDPA fwd ms",
            "speed-up",
            "favor causal f+b ms",
            "SDPA causal f+b ms",
            "speed-up",
            "favor causal f+b MiB",
            "SDPA causal f+b MiB",
        ],
        [
            [
                r["L"],
                fmt(r["favor_fwd_ms"], ".1f"),
                fmt(r["sdpa_fwd_ms"], ".1f"),
                fmt(r["fwd_speedup"], ".1f") + "x",
                fmt(r["favor_causal_fwdbwd_ms"], ".1f"),
                fmt(r["sdpa_causal_fwdbwd_ms"], ".1f"),
                fmt(r["causal_fwdbwd_speedup"], ".1f") + "x",
                fmt(r.get("favor_causal_fwdbwd_mib"), ".0f"),
                fmt(r.get("sdpa_causal_fwdbwd_mib"), ".0f"),
            ]
            for r in rows
        ],
        caption=(
            "milliseconds per call (median, interleaved), peak MiB of a fresh process; favor's time is linear in L, "
            f"SDPA's quadratic: at L={last.get('L')} favor runs at {fmt(last.get('fwd_speedup'), '.1f')}x SDPA's "
            f"speed forward and {fmt(last.get('causal_fwdbwd_speedup'), '.1f')}x causal forward+backward" + mem
            if rows
            else None
        ),
    )
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "speed.json").write_text(json.dumps(rows, indent=2))
    return rows


def _table(echo: Callable[[str], None], title: str, header: list[str], rows: list[list], caption: str | None = None):
    """A demo table: right-aligned columns under a rule, and a one-line caption."""
    echo(format_table(title, header, rows, caption, indent="  ", rule=True))


def run_demo(
    out_dir: str | Path,
    *,
    lengths: list[int],
    lm_seconds: float,
    lm_context: int,
    skip_speed: bool = False,
    echo: Callable[[str], None] = _silent,
) -> dict[str, Any]:
    """``favor demo``: (a) the approximation table, (b) the speed table (unless
    ``skip_speed``), (c)-(d) the language models (unless ``lm_seconds`` is 0), each printed
    through ``echo`` as a table with a caption; writes OUT/demo.json and the PNG plots and
    returns the report."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report: dict = {"approximation": _approximation(out, echo)}
    if not skip_speed:
        report["speed"] = _speed(out, lengths, echo)
    if lm_seconds > 0:
        report["language_model"] = _language_model(out, lm_seconds, lm_context, echo)
    (out / "demo.json").write_text(json.dumps(report, indent=2, default=str))
    echo(f"\nwrote {out}/demo.json and PNG plots in {time.perf_counter() - t0:.0f} s")
    return report
