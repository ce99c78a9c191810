"""Per-token decoding latency vs context length: favor.step from the state (O(M' Dv) per
token) vs scaled_dot_product_attention over a KV cache (O(L D) per token).

    python -m benchmarks.decode [--contexts 1024,4096,16384,65536] [--steps 100] [--device cuda]
"""

from __future__ import annotations

import argparse

from ._common import OUT, add_device, header, pyplot, write_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decode", description=__doc__)
    parser.add_argument("--contexts", default="1024,4096,16384,65536")
    parser.add_argument("--steps", type=int, default=100)
    add_device(parser)
    args = parser.parse_args(argv)
    from favor.benchmarking.timing import BenchConfig, decode_latency

    cfg = BenchConfig(device=args.device)
    info = header(
        f"decode: B={cfg.batch} H={cfg.heads} D={cfg.dim} M={cfg.num_features}, median of {args.steps} tokens",
        args.device,
    )
    rows = [decode_latency(int(c), cfg, steps=args.steps) for c in args.contexts.split(",")]
    base = rows[0]["favor_step_s"]
    print(f"{'context':>8} {'favor us':>9} {'vs first':>9} {'SDPA+KV us':>11} {'SDPA/favor':>11}")
    for r in rows:
        print(
            f"{r['context']:>8} {1e6 * r['favor_step_s']:>9.0f} {r['favor_step_s'] / base:>8.2f}x "
            f"{1e6 * r['sdpa_kv_cache_s']:>11.0f} {r['sdpa_kv_cache_s'] / r['favor_step_s']:>10.1f}x"
        )
    path = write_json("decode", {"machine": info, "rows": rows})
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ctx = [r["context"] for r in rows]
    ax.loglog(ctx, [1e6 * r["favor_step_s"] for r in rows], "C0-o", label="favor.step (state)")
    ax.loglog(ctx, [1e6 * r["sdpa_kv_cache_s"] for r in rows], "C1-o", label="SDPA + KV cache")
    ax.set_xlabel("context length")
    ax.set_ylabel("microseconds per token")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "decode.png", dpi=110)
    print(f"wrote {path} and {OUT / 'decode.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
