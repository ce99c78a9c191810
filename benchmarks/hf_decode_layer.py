"""One decoding token of one attention layer at SmolLM2-135M's shapes (9 query heads, 3
key/value heads, head dim 64, the decoder recipe's adapter: dense features, M = 256), with
exact window W and S sinks, through favor's attention function and a FavorCache layer:
the fused step (favor.ops.local.fused through favor.hf.decode._exact_fused), the round-1
lean step (exact_step_lean), the general step they replace (exact_step through
exact_attention) and the no-attention floor (attention returning V).

    python -m benchmarks.hf_decode_layer [--window 64] [--sinks 4] [--tokens 400] [--suffix _fast2]
        [--distilled DIR --layer 15 [--tie-keys]] [--prompt N] [--evict MB]

Random weights (or, with ``--distilled``, one layer of a `favor distill` directory: its
trained adapter and exact terms); a prompt of W + 200 tokens first (``--prompt``: another
length; below W + S the ring is not yet full, the unwrapped phase). ``--tie-keys``: the
distilled layer with each group's first head's key map, shift and dense a copied to the
group (the trained projection kept), so that decoding keeps one far state per key/value
head (favor.hf.tie): the speed a tied distillation would decode at, not its quality. Steps are taken round-robin over the
paths (the machine is shared), median per call; torch ops per call are counted with a
dispatch mode (views included). The fused and lean paths must give the general path's
outputs (float32 round-off) or nothing is timed. ``--evict MB`` reads a buffer of that
size before every timed call (not timed): in a model the other layers' weights evict a
layer's state from the caches between its calls, which a one-layer loop never does.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from ._common import OUT, header, pyplot

HEADS, KV_HEADS, DIM = 9, 3, 64


def _layer(window: int, sinks: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    import favor.hf as fh

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=HEADS * DIM,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        num_hidden_layers=1,
        intermediate_size=64,
        vocab_size=64,
        attn_implementation="sdpa",
    )
    model = fh.performerize(LlamaForCausalLM(cfg).eval(), seed=0, exact_window=window, exact_sinks=sinks)
    return model.model.layers[0].self_attn


def _distilled_layer(path: str, layer: int, *, tie: bool = False):
    """Layer ``layer``'s attention module of a `favor distill` directory (its adapter); with
    ``tie`` its key side tied per group by copying each group's first head's (for timing)."""
    import favor.hf as fh

    model = fh.from_pretrained(path).eval()
    module = model.model.layers[layer].self_attn
    if tie:
        adapter, groups = module.favor, HEADS // KV_HEADS
        with torch.no_grad():
            for t in (adapter.key_map, adapter.key_shift, adapter.dense_a):
                t.copy_(t[::groups].repeat_interleave(groups, 0))
    return module


def _count_ops(fn) -> int:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


@torch.no_grad()
def measure(
    window: int, sinks: int, tokens: int, *, module=None, prompt: int | None = None, evict: float = 0.0
) -> dict:
    import favor.hf.decode as decode
    from favor.hf.cache import FavorLayer
    from favor.hf.interface import favor_attention_forward

    from .hf_generate import _value_only

    module = _layer(window, sinks) if module is None else module
    g = torch.Generator().manual_seed(0)
    flush = torch.ones(int(evict * 2**18)) if evict else None  # evict MB of float32

    def qkv(length):
        return (
            torch.randn(1, HEADS, length, DIM, generator=g),
            torch.randn(1, KV_HEADS, length, DIM, generator=g),
            torch.randn(1, KV_HEADS, length, DIM, generator=g),
        )

    prompt = qkv(window + 200 if prompt is None else prompt)
    layers = {"fused": FavorLayer(), "lean": FavorLayer(), "general": FavorLayer()}
    eligible, fused = decode.lean_eligible, decode._exact_fused

    def call(name, q, k, v):
        if name == "floor":
            return _value_only(module, q, k, v, None)[0]
        layer = layers[name]
        decode.lean_eligible = eligible if name != "general" else (lambda *a: False)
        decode._exact_fused = fused if name == "fused" else (lambda *a: None)
        try:
            k, v = layer.update(k, v)
            return favor_attention_forward(module, q, k, v, None, scaling=DIM**-0.5)[0]
        finally:
            decode.lean_eligible, decode._exact_fused = eligible, fused

    for name in layers:
        call(name, *prompt)
    steps = [qkv(1) for _ in range(tokens)]
    err = 0.0
    for s in steps[:20]:  # warm-up, and the fused and lean paths' check
        a, b, c = call("fused", *s), call("lean", *s), call("general", *s)
        err = max(err, float((a - c).abs().max()), float((b - c).abs().max()))
    if not err < 1e-4:  # float32 round-off of outputs of size ~1
        raise RuntimeError(f"fused/lean and general decoding steps differ by {err:.3g}: refusing to time")
    fused_ran = layers["fused"].lean is not None
    if not fused_ran and prompt is None:
        raise RuntimeError("the fused step did not run: refusing to time it")
    times = {"fused": [], "lean": [], "general": [], "floor": []}
    for s in steps[20:]:
        for name in times:
            if flush is not None:
                flush.sum()
            t0 = time.perf_counter()
            call(name, *s)
            times[name].append(time.perf_counter() - t0)
    s = steps[-1]
    ops = {name: _count_ops(lambda name=name: call(name, *copy.copy(s))) for name in times}
    return {
        "window": window,
        "sinks": sinks,
        "tokens": len(steps) - 20,
        "prompt": len(prompt[0][0, 0]),
        "evict_mb": evict,
        "fused_ran": fused_ran,
        # the far state once per key/value head (LeanConstants.shared) or per query head
        "fused_shared": fused_ran and layers["fused"].lean.shared,
        "check_max_abs": err,
        "ms": {name: 1e3 * statistics.median(t) for name, t in times.items()},
        "ops": ops,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hf_decode_layer", description=__doc__)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=400)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--suffix", default="", help="appended to the result files' names (e.g. _fast2)")
    parser.add_argument("--distilled", help="time this `favor distill` directory's layer (its adapter and exact terms)")
    parser.add_argument("--layer", type=int, default=15, help="with --distilled: which layer")
    parser.add_argument("--tie-keys", action="store_true", help="with --distilled: its key side tied per group")
    parser.add_argument("--prompt", type=int, help="prompt length (default W + 200)")
    parser.add_argument("--evict", type=float, default=0.0, help="MB read before every timed call (default 0)")
    args = parser.parse_args(argv)
    module = None
    if args.distilled:
        module = _distilled_layer(args.distilled, args.layer, tie=args.tie_keys)
        adapter = module.favor
        args.window, args.sinks = adapter.exact_window, adapter.exact_sinks
    info = header(
        f"hf_decode_layer: H={HEADS}, Hkv={KV_HEADS}, D={DIM}, W={args.window}, S={args.sinks}, float32, B=1"
        + (f", {args.distilled} layer {args.layer}" if args.distilled else ", random weights")
    )
    r = measure(args.window, args.sinks, args.tokens, module=module, prompt=args.prompt, evict=args.evict)
    r["distilled"] = args.distilled and f"{args.distilled} layer {args.layer}" + (
        ", key side tied" if args.tie_keys else ""
    )
    for name in ("fused", "lean", "general", "floor"):
        print(f"{name:8s} {r['ms'][name]:.3f} ms/layer/token, {r['ops'][name]} torch ops per call")
    print(
        f"fused / lean {r['ms']['fused'] / r['ms']['lean']:.2f}x, fused / general "
        f"{r['ms']['fused'] / r['ms']['general']:.2f}x (check max |diff| {r['check_max_abs']:.1e})"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"hf_decode_layer_w{args.window}_s{args.sinks}{args.suffix}"
    (args.out / f"{name}.json").write_text(json.dumps({"machine": info, **r}, indent=2))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3))
    labels = ["general", "lean", "fused", "floor"]
    ax.bar(labels, [r["ms"][x] for x in labels], color=["C1", "C3", "C0", "C2"])
    for i, x in enumerate(labels):
        ax.text(i, r["ms"][x], f"{r['ops'][x]} ops", ha="center", va="bottom")
    ax.set_ylabel("ms per layer per token")
    ax.set_title(f"SmolLM2 layer, W={args.window}, S={args.sinks}")
    fig.tight_layout()
    fig.savefig(args.out / f"{name}.png", dpi=110)
    print(f"wrote {args.out / (name + '.json')} and {args.out / (name + '.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
