"""Generation with a performerized Hugging Face decoder: time per new token after a long
prompt, FavorCache (FAVOR's recurrent state, favor.hf.cache) vs softmax (sdpa) with
transformers' KV cache (DynamicCache), on a random-weight Llama; also prefill time and the
bytes each cache holds.

    python -m benchmarks.hf_generate [--quick] [--contexts 512,4096,16384,32768] [--tokens 16]
        [--model smollm2 --variants untied,tied --like-distilled] [--sdpa-max 16384] [--suffix _s25]

``--variants untied,tied`` (with ``--model``): two favor models timed in the same run, the
key side calibrated per query head and tied per key/value group (performerize's
``tie_keys``: the fused step then keeps one far state per key/value head);
``--like-distilled``: calibrated on two random 256-token passages and the projection's e
column set nonzero, so that decoding takes the path of a distilled model (per-head maps,
dense a, the e column; its speed, not its quality). The models share the softmax model's
weights (one copy in memory). ``--sdpa-max``: sdpa is not run above that context (its
K/V cache at 32k is 1.5 GB for SmolLM2).

One prefill of each model per context (timed), then ``--tokens`` new tokens taken
round-robin over every (context, model) pair (forwards, then backwards), so that all see
the same machine load (a shared machine drifts by several x over minutes); median per token.
Ratios come from the same run: favor / floor and sdpa / favor as the median over rounds of
the two tokens' ratio (the JSON keeps the ratio of the medians too, ``*_of_medians``),
favor at L / favor at the first L likewise. The
favor path is checked first: its cached logits must equal its teacher-forced ones.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch

from ._common import OUT, header, pyplot

#: the issue's model: hidden 512, 8 heads (D = 64), 4 layers, intermediate 1024
MODEL = dict(hidden_size=512, num_attention_heads=8, num_hidden_layers=4, intermediate_size=1024, vocab_size=1024)
NUM_FEATURES = 256


def _models(
    max_len: int,
    *,
    exact_window: int = -1,
    exact_sinks: int = 0,
    model: str | None = None,
    distilled: str | None = None,
    variants: tuple[str, ...] = ("favor",),
    like_distilled: bool = False,
):
    """(softmax, {name: favor model}); the favor models share the softmax model's weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import favor.hf as fh

    if model is not None:  # a real causal LM (favor.data.models), performerized with the defaults
        from favor.data.models import load_causal_lm

        softmax = load_causal_lm(model)[0].eval()
        softmax.set_attn_implementation("sdpa")
        MODEL["vocab_size"] = softmax.config.vocab_size
        if distilled is not None:  # what `favor distill` wrote: its trained adapters and exact terms
            return softmax, {"favor": fh.from_pretrained(distilled).eval()}
        window = {} if exact_window < 0 else {"exact_window": exact_window, "exact_sinks": exact_sinks}
        calibration = None
        g = torch.Generator().manual_seed(0)
        if like_distilled:
            calibration = [
                {"input_ids": torch.randint(0, MODEL["vocab_size"], (1, 256), generator=g)} for _ in range(2)
            ]
        out = {}
        for name in variants:
            performer = fh.performerize(
                _shared_copy(softmax), seed=0, calibration=calibration, tie_keys=name == "tied", **window
            )
            if like_distilled:
                _trained_e_column(performer, g)
            out[name] = performer.eval()
        return softmax, out
    torch.manual_seed(0)
    cfg = LlamaConfig(**MODEL, max_position_embeddings=max_len, attn_implementation="sdpa")
    softmax = LlamaForCausalLM(cfg).eval()
    performer = fh.performerize(
        _shared_copy(softmax),
        kernel="oprf",
        plain=True,
        num_features=NUM_FEATURES,
        seed=0,
        exact_window=exact_window,
        exact_sinks=exact_sinks,
    )
    return softmax, {"favor": performer}


def _described(softmax, model: str | None) -> dict:
    """The timed model's name (None: the random Llama) and shape, from its config."""
    cfg = softmax.config
    keys = ("hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers")
    keys += ("intermediate_size", "vocab_size")
    return {"name": model, **{k: getattr(cfg, k, None) for k in keys}}


def _shared_copy(model):
    """A deep copy of ``model`` that shares its parameters (one copy of the weights in memory)."""
    return copy.deepcopy(model, memo={id(p): p for p in model.parameters()})


@torch.no_grad()
def _trained_e_column(performer, generator) -> None:
    """The projections' e column set nonzero, as distillation leaves it (dense_projection
    makes it zero): decoding then computes each row's e (favor.ops.local.fused)."""
    import favor.hf as fh

    for module in performer.modules():
        if isinstance(module, fh.FavorAdapter) and module.dense:
            p = module.feature_map.projection
            p[:, 2 * module.dim].copy_(0.05 * torch.randn(p.shape[0], generator=generator))


def _value_only(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The no-attention floor: each query position's own value (attention that costs nothing)."""
    from favor.hf.adapter import repeat_kv

    v = repeat_kv(value, query.shape[1])
    return v[:, :, -query.shape[2] :].transpose(1, 2).contiguous(), None


def floor_model(softmax):
    """The same model with attention returning V, run without a cache: what a token costs
    when attention costs nothing (the issue's floor)."""
    from transformers import AttentionInterface

    AttentionInterface.register("value_only", _value_only)
    floor = _shared_copy(softmax)
    floor.set_attn_implementation("value_only")
    return floor


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _kv_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@torch.no_grad()
def check(performer, length: int | None = None, tokens: int = 4) -> float:
    """Max |cached - teacher-forced| logits of the favor model (float32), or raise. Without
    ``length``: a 96-token prompt, and where the model has exact terms also one long enough
    that the last tokens take the steady state's fused step (positions past W + S + 1; at
    96 a W >= 96 model's tokens take the step for a ring not yet full)."""
    import favor.hf as fh

    if length is None:
        adapters = [m for m in performer.modules() if isinstance(m, fh.FavorAdapter)]
        longest = max([96] + [a.exact_window + a.exact_sinks + 2 for a in adapters])
        return max(check(performer, n, tokens) for n in sorted({96, longest}))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, MODEL["vocab_size"], (1, length + tokens), generator=g)
    full = performer(input_ids=ids).logits
    cache = fh.FavorCache(performer)
    steps = [performer(input_ids=ids[:, :length], cache=cache, use_cache=True).logits]
    for t in range(length, length + tokens):
        steps.append(performer(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    err = float((torch.cat(steps, 1) - full).abs().max())
    # float32, chunked vs recurrent summation order: round-off of logits of size ~1
    if not err < 1e-3:
        raise RuntimeError(f"FavorCache logits differ from teacher forcing by {err:.3g}: refusing to time")
    return err


@torch.no_grad()
def measure(softmax, performers: dict, contexts: list[int], tokens: int, *, sdpa_max: int | None = None) -> list[dict]:
    """Prefill every context (timed), then new tokens round-robin over contexts and models,
    so that every (context, model) pair sees the same machine load; the floor (attention
    returning V, no cache: ``floor_model``) is timed beside each context's tokens. sdpa is
    left out above ``sdpa_max``."""
    import favor.hf as fh

    floor = floor_model(softmax)

    runs = []
    for context in contexts:
        g = torch.Generator().manual_seed(context)
        ids = torch.randint(0, MODEL["vocab_size"], (1, context), generator=g)
        nxt = torch.randint(0, MODEL["vocab_size"], (1, tokens), generator=g)
        r = {"context": context, "next": nxt, "caches": {}, "times": {}}
        for name, performer in performers.items():
            cache = fh.FavorCache(performer)
            # logits of the last position only: a real vocabulary times a long prompt is GBs
            _, r[f"{name}_prefill_s"] = _timed(
                lambda ids=ids, c=cache, m=performer: m(input_ids=ids, cache=c, use_cache=True, logits_to_keep=1)
            )
            r["caches"][name] = (performer, cache)
            r[f"{name}_cache_bytes_after_prompt"] = cache.nbytes
        if sdpa_max is None or context <= sdpa_max:
            out, r["sdpa_prefill_s"] = _timed(lambda ids=ids: softmax(input_ids=ids, use_cache=True, logits_to_keep=1))
            r["caches"]["sdpa"] = (softmax, out.cache)
        print(
            f"prefill {context:>6}: "
            + ", ".join(f"{n} {r[f'{n}_prefill_s']:.2f} s" for n in [*performers, "sdpa"] if f"{n}_prefill_s" in r),
            flush=True,
        )
        r["times"] = {name: [] for name in [*r["caches"], "floor"]}
        runs.append(r)
    for t in range(tokens):
        # odd rounds run backwards, so that no (context, model) always follows the largest
        # sdpa step (which allocates and frees its whole K/V cache)
        order = [(r, m) for r in runs for m in r["times"]]
        for r, m in order if t % 2 == 0 else order[::-1]:
            tok = r["next"][:, t : t + 1]
            if m == "floor":
                _, dt = _timed(lambda tok=tok: floor(input_ids=tok, use_cache=False))
            else:
                model, cache = r["caches"][m]
                _, dt = _timed(lambda tok=tok, model=model, c=cache: model(input_ids=tok, cache=c, use_cache=True))
            r["times"][m].append(dt)
    warm = 2 if tokens > 4 else 0  # the first tokens warm caches and allocators
    rows = []
    for r in runs:
        caches, times = r.pop("caches"), r.pop("times")
        r.pop("next")
        for m, ts in times.items():
            r[f"{m}_token_all_s"] = ts
            r[f"{m}_token_s"] = statistics.median(ts[warm:])
        for name in performers:
            # ratios per round (the two tokens ran moments apart), then their median: a shared
            # machine switches between fast and slow phases for several rounds, and a ratio
            # of the two medians can pair one model's fast phase with the other's slow one
            r[f"{name}_over_floor"] = _paired(times[name][warm:], times["floor"][warm:])
            r[f"{name}_over_floor_of_medians"] = r[f"{name}_token_s"] / r["floor_token_s"]
            first = rows[0] if rows else r  # favor at this context against the first, per round too
            r[f"{name}_vs_first"] = _paired(times[name][warm:], first[f"{name}_token_all_s"][warm:])
            r[f"{name}_cache_bytes"] = caches[name][1].nbytes
            if "sdpa" in times:
                r[f"sdpa_over_{name}"] = _paired(times["sdpa"][warm:], times[name][warm:])
        if "sdpa" in times:
            r["sdpa_cache_bytes"] = _kv_bytes(caches["sdpa"][1])
        rows.append(r)
    return rows


def _paired(a: list[float], b: list[float]) -> float:
    """The median over rounds of a[t] / b[t]."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def markdown(
    rows: list[dict],
    info: dict,
    command: str,
    local: dict | None = None,
    model: str | None = None,
    names: tuple[str, ...] = ("favor",),
    like_distilled: bool = False,
    distilled: str | None = None,
) -> str:
    end = info.get("load_avg_end")
    lines = [
        "# favor.hf generation: FavorCache vs sdpa + KV cache",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['threads']} torch threads, torch {info['torch']}, "
        f"load average at start {', '.join(f'{x:.1f}' for x in info['load_avg'])}"
        + (f", at the end {', '.join(f'{x:.1f}' for x in end)}" if end else "")
        + " (a machine shared with other jobs: absolute times are noisy, "
        "the ratios come from one run, new tokens taken round-robin over every context and model; "
        "favor/floor, sdpa/favor and favor vs @first are medians of the ratios per round).",
        "",
        (
            f"Model: {model} (favor.data.models), float32; favor: performerize(<defaults>"
            if model
            else f"Model: random-weight Llama, hidden {MODEL['hidden_size']}, {MODEL['num_attention_heads']} heads, "
            f"{MODEL['num_hidden_layers']} layers, intermediate {MODEL['intermediate_size']}, vocab {MODEL['vocab_size']}, "
            f"float32; favor: performerize(num_features={NUM_FEATURES}"
        )
        + (
            "".join(f", {k}={v}" for k, v in local.items())
            if local and local["exact_window"] + local["exact_sinks"] > -1
            else ""
        )
        + (
            (
                ") calibrated on two random 256-token passages, e column nonzero (a distilled model's decode path)"
                if like_distilled
                else f") as `favor distill` trained it ({distilled})"
                if distilled
                else ") zero-shot"
            )
            + (", key side per query head (untied) and tied per key/value group (tied)" if "tied" in names else "")
            + ", batch 1."
            if model
            else ") (FAVOR++), batch 1."
        ),
        "",
    ]
    head = ["context", "floor ms/token"]
    for n in names:
        head += [f"{n} ms/token", f"{n} vs @first", f"{n}/floor", f"sdpa/{n}", f"{n} cache MB"]
    head += ["sdpa+KV ms/token", "sdpa cache MB"] + [f"{n} prefill s" for n in names] + ["sdpa prefill s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["context"]), f"{1e3 * r['floor_token_s']:.2f}"]
        for n in names:
            sdpa = r.get(f"sdpa_over_{n}")
            cells += [
                f"{1e3 * r[f'{n}_token_s']:.2f}",
                f"{r[f'{n}_vs_first']:.2f}x",
                f"{r[f'{n}_over_floor']:.2f}x",
                "-" if sdpa is None else f"{sdpa:.2f}x",
                f"{r[f'{n}_cache_bytes'] / 1e6:.1f}",
            ]
        has = "sdpa_token_s" in r
        cells += [
            f"{1e3 * r['sdpa_token_s']:.2f}" if has else "-",
            f"{r['sdpa_cache_bytes'] / 1e6:.1f}" if has else "-",
        ]
        cells += [f"{r[f'{n}_prefill_s']:.2f}" for n in names]
        cells += [f"{r['sdpa_prefill_s']:.2f}" if has else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hf_generate", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="contexts 256,1024 and 6 tokens (a smoke run)")
    parser.add_argument("--contexts", default="512,4096,16384,32768")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--exact-window", type=int, default=-1, help="favor with exact local terms (default: none)")
    parser.add_argument("--exact-sinks", type=int, default=0)
    parser.add_argument(
        "--model", help="a real causal LM instead of the random Llama: smollm2, a .gguf file or a directory"
    )
    parser.add_argument(
        "--distilled",
        help="with --model: time this `favor distill` directory as favor (its own exact terms; "
        "--exact-window / --exact-sinks then only name the files)",
    )
    parser.add_argument(
        "--variants",
        default="favor",
        help="with --model (not --distilled): favor models timed in one run, of 'untied' (key side per query "
        "head) and 'tied' (per key/value group: performerize's tie_keys), e.g. untied,tied (default: one, 'favor')",
    )
    parser.add_argument(
        "--like-distilled",
        action="store_true",
        help="with --model: calibrate on two random passages and set the e column nonzero (a distilled model's "
        "decode path)",
    )
    parser.add_argument("--sdpa-max", type=int, help="no sdpa above this context (its K/V cache's memory)")
    parser.add_argument("--suffix", default="", help="appended to the result files' names (e.g. _s25)")
    parser.add_argument("--out", type=Path, default=OUT, help=f"directory for JSON/PNG/MD (default {OUT})")
    args = parser.parse_args(argv)
    if args.distilled and not args.model:
        parser.error("--distilled needs --model (the softmax baseline it was distilled from)")
    variants = tuple(args.variants.split(","))
    if variants != ("favor",) and (not args.model or args.distilled or not set(variants) <= {"untied", "tied"}):
        parser.error("--variants takes 'untied' and/or 'tied', with --model and without --distilled")
    if args.like_distilled and (not args.model or args.distilled):
        parser.error("--like-distilled needs --model and no --distilled")
    contexts = [256, 1024] if args.quick else [int(c) for c in args.contexts.split(",")]
    tokens = 6 if args.quick else args.tokens
    import transformers

    info = header(
        f"hf_generate: {args.model or f'Llama {MODEL}, M={NUM_FEATURES}'}, float32, B=1, {tokens} new tokens per context, "
        f"transformers {transformers.__version__}"
    )
    local = {"exact_window": args.exact_window, "exact_sinks": args.exact_sinks}
    softmax, performers = _models(
        max(contexts) + tokens + 8,
        **local,
        model=args.model,
        distilled=args.distilled,
        variants=variants,
        like_distilled=args.like_distilled,
    )
    names = tuple(performers)
    err = max(check(p) for p in performers.values())
    print(f"check: favor cached vs teacher-forced logits, max |diff| {err:.2e}")
    rows = measure(softmax, performers, contexts, tokens, sdpa_max=args.sdpa_max)
    info["load_avg_end"] = list(os.getloadavg())
    for r in rows:
        for n in names:
            sdpa = r.get(f"sdpa_over_{n}")
            print(
                f"context {r['context']:>6}: {n} {1e3 * r[f'{n}_token_s']:8.2f} ms/token "
                f"({r[f'{n}_over_floor']:.2f}x the floor, {1e3 * r['floor_token_s']:.2f} ms)"
                + ("" if sdpa is None else f", sdpa+KV {1e3 * r['sdpa_token_s']:8.2f} ms/token ({sdpa:.2f}x)")
                + f"; cache bytes {n} {r[f'{n}_cache_bytes']:,}"
                + (f", sdpa {r['sdpa_cache_bytes']:,}" if "sdpa_cache_bytes" in r else "")
            )
    for n in names:
        print(f"{n} per-token time at {contexts[-1]} / at {contexts[0]}: {rows[-1][f'{n}_vs_first']:.2f}x")
        print(f"{n} cache bytes identical at every context: {len({r[f'{n}_cache_bytes'] for r in rows}) == 1}")
    print(f"load average at the end: {info['load_avg_end']}")
    policy = os.environ.get("OMP_WAIT_POLICY")
    command = (f"OMP_WAIT_POLICY={policy} " if policy else "") + "python -m benchmarks.hf_generate"
    command += " --quick" if args.quick else ""
    command += f" --model {args.model}" if args.model else ""
    command += f" --distilled {args.distilled}" if args.distilled else ""
    command += f" --variants {args.variants}" if variants != ("favor",) else ""
    command += " --like-distilled" if args.like_distilled else ""
    if not args.quick and (args.contexts != parser.get_default("contexts") or args.tokens != 16):
        command += f" --contexts {args.contexts} --tokens {args.tokens}"
    command += f" --sdpa-max {args.sdpa_max}" if args.sdpa_max else ""
    command += f" --suffix {args.suffix}" if args.suffix else ""
    command += f" --out {args.out}" if args.out != OUT else ""
    args.out.mkdir(parents=True, exist_ok=True)
    name = "hf_generate_quick" if args.quick else "hf_generate"
    if args.model and args.model.isidentifier():
        name += f"_{args.model}"
    if args.exact_window >= 0 or args.exact_sinks > 0:
        name += f"_w{args.exact_window}_s{args.exact_sinks}"
        command += f" --exact-window {args.exact_window} --exact-sinks {args.exact_sinks}"
    name += args.suffix
    data = {"machine": info, "model": _described(softmax, args.model), "tokens": tokens, "check_max_abs": err}
    if not args.model:  # the random Llama's performer; a real model's features are its own
        data["num_features"] = NUM_FEATURES
    data.update(local, distilled=args.distilled, variants=names, like_distilled=args.like_distilled)
    path = args.out / f"{name}.json"
    path.write_text(json.dumps({**data, "rows": rows}, indent=2, default=str))
    (args.out / f"{name}.md").write_text(
        markdown(rows, info, command, local, args.model, names, args.like_distilled, args.distilled)
    )
    plt = pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    for i, n in enumerate(names):
        ctx = [r["context"] for r in rows]
        ax.loglog(ctx, [1e3 * r[f"{n}_token_s"] for r in rows], f"C{i}-o", label=f"{n} (FavorCache)")
        bx.loglog(ctx, [r[f"{n}_cache_bytes"] for r in rows], f"C{i}-o", label=f"{n} (FavorCache)")
    ctx = [r["context"] for r in rows]
    ax.loglog(ctx, [1e3 * r["floor_token_s"] for r in rows], "k--", label="floor (attention returns V)")
    sd = [r for r in rows if "sdpa_token_s" in r]
    ax.loglog([r["context"] for r in sd], [1e3 * r["sdpa_token_s"] for r in sd], "C3-s", label="sdpa + KV cache")
    ax.set_xlabel("prompt length")
    ax.set_ylabel("ms per new token")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    bx.loglog([r["context"] for r in sd], [r["sdpa_cache_bytes"] for r in sd], "C3-s", label="DynamicCache (K/V)")
    bx.set_xlabel("prompt length")
    bx.set_ylabel("cache bytes")
    bx.grid(True, which="both", alpha=0.3)
    bx.legend()
    fig.tight_layout()
    fig.savefig(args.out / f"{name}.png", dpi=110)
    print(f"wrote {path}, {args.out / (name + '.md')} and {args.out / (name + '.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
