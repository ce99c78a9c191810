"""Generation with a performerized Hugging Face decoder: time per new token after a long
prompt, FavorCache (FAVOR's recurrent state, favor.hf.cache) vs softmax (sdpa) with
transformers' KV cache (DynamicCache), on a random-weight Llama; also prefill time and the
bytes each cache holds.

    python -m benchmarks.hf_generate [--quick] [--contexts 512,4096,16384,32768] [--tokens 16]

One prefill of each model per context (timed), then ``--tokens`` new tokens taken
round-robin over every (context, model) pair (forwards, then backwards), so that all see
the same machine load (a shared machine drifts by several x over minutes); median per token.
Ratios (sdpa / favor, favor at L / favor at the first L) come from the same run. The
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
):
    from transformers import LlamaConfig, LlamaForCausalLM

    import favor.hf as fh

    if model is not None:  # a real causal LM (favor.data.models), performerized with the defaults
        from favor.data.models import load_causal_lm

        softmax = load_causal_lm(model)[0].eval()
        softmax.set_attn_implementation("sdpa")
        MODEL["vocab_size"] = softmax.config.vocab_size
        if distilled is not None:  # what `favor distill` wrote: its trained adapters and exact terms
            return softmax, fh.from_pretrained(distilled).eval()
        window = {} if exact_window < 0 else {"exact_window": exact_window, "exact_sinks": exact_sinks}
        return softmax, fh.performerize(copy.deepcopy(softmax), seed=0, **window)
    torch.manual_seed(0)
    cfg = LlamaConfig(**MODEL, max_position_embeddings=max_len, attn_implementation="sdpa")
    softmax = LlamaForCausalLM(cfg).eval()
    performer = fh.performerize(
        copy.deepcopy(softmax),
        kernel="oprf",
        plain=True,
        num_features=NUM_FEATURES,
        seed=0,
        exact_window=exact_window,
        exact_sinks=exact_sinks,
    )
    return softmax, performer


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
    floor = copy.deepcopy(softmax)
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
def measure(softmax, performer, contexts: list[int], tokens: int) -> list[dict]:
    """Prefill every context (timed), then new tokens round-robin over contexts and models,
    so that every (context, model) pair sees the same machine load; the floor (attention
    returning V, no cache: ``floor_model``) is timed beside each context's tokens."""
    import favor.hf as fh

    floor = floor_model(softmax)

    runs = []
    for context in contexts:
        g = torch.Generator().manual_seed(context)
        ids = torch.randint(0, MODEL["vocab_size"], (1, context), generator=g)
        nxt = torch.randint(0, MODEL["vocab_size"], (1, tokens), generator=g)
        fcache = fh.FavorCache(performer)
        # logits of the last position only: a real vocabulary times a long prompt is GBs
        _, favor_prefill = _timed(
            lambda ids=ids, c=fcache: performer(input_ids=ids, cache=c, use_cache=True, logits_to_keep=1)
        )
        out, sdpa_prefill = _timed(lambda ids=ids: softmax(input_ids=ids, use_cache=True, logits_to_keep=1))
        print(f"prefill {context:>6}: favor {favor_prefill:.2f} s, sdpa {sdpa_prefill:.2f} s", flush=True)
        runs.append(
            {
                "context": context,
                "next": nxt,
                "fcache": fcache,
                "scache": out.cache,
                "favor_prefill_s": favor_prefill,
                "sdpa_prefill_s": sdpa_prefill,
                "favor_cache_bytes_after_prompt": fcache.nbytes,
                "favor_token_all_s": [],
                "sdpa_token_all_s": [],
                "floor_token_all_s": [],
            }
        )
    for t in range(tokens):
        # odd rounds run backwards, so that no (context, model) always follows the largest
        # sdpa step (which allocates and frees its whole K/V cache)
        order = [(r, m) for r in runs for m in ("favor", "sdpa", "floor")]
        for r, m in order if t % 2 == 0 else order[::-1]:
            tok = r["next"][:, t : t + 1]
            if m == "floor":
                _, dt = _timed(lambda tok=tok: floor(input_ids=tok, use_cache=False))
                r["floor_token_all_s"].append(dt)
                continue
            model, cache = (performer, r["fcache"]) if m == "favor" else (softmax, r["scache"])
            _, dt = _timed(lambda tok=tok, model=model, c=cache: model(input_ids=tok, cache=c, use_cache=True))
            r[f"{m}_token_all_s"].append(dt)
    warm = 2 if tokens > 4 else 0  # the first tokens warm caches and allocators
    rows = []
    for r in runs:
        fcache, scache = r.pop("fcache"), r.pop("scache")
        r.pop("next")
        r["favor_token_s"] = statistics.median(r["favor_token_all_s"][warm:])
        r["sdpa_token_s"] = statistics.median(r["sdpa_token_all_s"][warm:])
        r["floor_token_s"] = statistics.median(r["floor_token_all_s"][warm:])
        r["sdpa_over_favor"] = r["sdpa_token_s"] / r["favor_token_s"]
        r["favor_over_floor"] = r["favor_token_s"] / r["floor_token_s"]
        r["favor_cache_bytes"] = fcache.nbytes
        r["sdpa_cache_bytes"] = _kv_bytes(scache)
        rows.append(r)
    return rows


def markdown(rows: list[dict], info: dict, command: str, local: dict | None = None, model: str | None = None) -> str:
    base = rows[0]["favor_token_s"]
    lines = [
        "# favor.hf generation: FavorCache vs sdpa + KV cache",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['threads']} torch threads, torch {info['torch']}, "
        f"load average at start {', '.join(f'{x:.1f}' for x in info['load_avg'])} (a machine shared with other jobs: absolute times are noisy, "
        "the ratios come from one run, new tokens taken round-robin over every context and model).",
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
        + (") zero-shot, batch 1." if model else ") (FAVOR++), batch 1."),
        "",
        "| context | favor ms/token | vs favor@first | floor ms/token | favor/floor | sdpa+KV ms/token | sdpa/favor "
        "| favor prefill s | sdpa prefill s | favor cache bytes | sdpa cache bytes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['context']} | {1e3 * r['favor_token_s']:.2f} | {r['favor_token_s'] / base:.2f}x "
            f"| {1e3 * r['floor_token_s']:.2f} | {r['favor_over_floor']:.2f}x "
            f"| {1e3 * r['sdpa_token_s']:.2f} | {r['sdpa_over_favor']:.1f}x | {r['favor_prefill_s']:.2f} "
            f"| {r['sdpa_prefill_s']:.2f} | {r['favor_cache_bytes']:,} | {r['sdpa_cache_bytes']:,} |"
        )
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
    parser.add_argument("--out", type=Path, default=OUT, help=f"directory for JSON/PNG/MD (default {OUT})")
    args = parser.parse_args(argv)
    if args.distilled and not args.model:
        parser.error("--distilled needs --model (the softmax baseline it was distilled from)")
    contexts = [256, 1024] if args.quick else [int(c) for c in args.contexts.split(",")]
    tokens = 6 if args.quick else args.tokens
    import transformers

    info = header(
        f"hf_generate: {args.model or f'Llama {MODEL}'}, M={NUM_FEATURES}, float32, B=1, {tokens} new tokens per context, "
        f"transformers {transformers.__version__}"
    )
    local = {"exact_window": args.exact_window, "exact_sinks": args.exact_sinks}
    softmax, performer = _models(max(contexts) + tokens + 8, **local, model=args.model, distilled=args.distilled)
    err = check(performer)
    print(f"check: favor cached vs teacher-forced logits, max |diff| {err:.2e}")
    rows = measure(softmax, performer, contexts, tokens)
    for r in rows:
        print(
            f"context {r['context']:>6}: favor {1e3 * r['favor_token_s']:8.2f} ms/token "
            f"({r['favor_over_floor']:.2f}x the floor, {1e3 * r['floor_token_s']:.2f} ms), sdpa+KV "
            f"{1e3 * r['sdpa_token_s']:8.2f} ms/token ({r['sdpa_over_favor']:.1f}x); cache bytes favor "
            f"{r['favor_cache_bytes']:,}, sdpa {r['sdpa_cache_bytes']:,}"
        )
    base = rows[0]["favor_token_s"]
    print(f"favor per-token time at {contexts[-1]} / at {contexts[0]}: {rows[-1]['favor_token_s'] / base:.2f}x")
    print(f"favor cache bytes identical at every context: {len({r['favor_cache_bytes'] for r in rows}) == 1}")
    policy = os.environ.get("OMP_WAIT_POLICY")
    command = (f"OMP_WAIT_POLICY={policy} " if policy else "") + "python -m benchmarks.hf_generate"
    command += " --quick" if args.quick else ""
    command += f" --model {args.model}" if args.model else ""
    command += f" --distilled {args.distilled}" if args.distilled else ""
    if not args.quick and (args.contexts != parser.get_default("contexts") or args.tokens != 16):
        command += f" --contexts {args.contexts} --tokens {args.tokens}"
    command += f" --out {args.out}" if args.out != OUT else ""
    args.out.mkdir(parents=True, exist_ok=True)
    name = "hf_generate_quick" if args.quick else "hf_generate"
    if args.exact_window >= 0 or args.exact_sinks > 0:
        name += f"_w{args.exact_window}_s{args.exact_sinks}"
        command += f" --exact-window {args.exact_window} --exact-sinks {args.exact_sinks}"
    data = {"machine": info, "model": MODEL, "num_features": NUM_FEATURES, "tokens": tokens, "check_max_abs": err}
    data.update(local, distilled=args.distilled)
    path = args.out / f"{name}.json"
    path.write_text(json.dumps({**data, "rows": rows}, indent=2, default=str))
    (args.out / f"{name}.md").write_text(markdown(rows, info, command, local, args.model))
    plt = pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    ctx = [r["context"] for r in rows]
    ax.loglog(ctx, [1e3 * r["favor_token_s"] for r in rows], "C0-o", label="favor (FavorCache)")
    ax.loglog(ctx, [1e3 * r["sdpa_token_s"] for r in rows], "C1-o", label="sdpa + KV cache")
    ax.set_xlabel("prompt length")
    ax.set_ylabel("ms per new token")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    bx.loglog(ctx, [r["favor_cache_bytes"] for r in rows], "C0-o", label="FavorCache")
    bx.loglog(ctx, [r["sdpa_cache_bytes"] for r in rows], "C1-o", label="DynamicCache (K/V)")
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
