"""One decoded token through ``favor.attention(..., initial_state=s, return_state=True)`` (the
recurrent step path for <= 4 queries) against ``favor.step`` on the same state: the same
arithmetic, so the ratio is the API's overhead. Medians of interleaved calls.

    python -m benchmarks.step_path [--tokens 300] [--device cuda]
"""

from __future__ import annotations

import argparse
import time

from ._common import add_device, header, write_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_path", description=__doc__)
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--context", type=int, default=1024)
    add_device(parser)
    args = parser.parse_args(argv)
    import torch

    import favor

    b, h, d, m = 1, 8, 64, 256
    info = header(f"step path: B={b} H={h} D={d} M={m}, context {args.context}, median of {args.tokens}", args.device)
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    fm = favor.FeatureMap("positive", dim=d, num_features=m, generator=g).to(dev)
    q, k, v = (torch.randn(b, h, args.context + 1, d, generator=g).to(dev) for _ in range(3))
    with torch.no_grad():
        _, state = favor.attention(q[..., :-1, :], k[..., :-1, :], v[..., :-1, :], fm, causal=True, return_state=True)
        qt, kt, vt = q[..., -1:, :], k[..., -1:, :], v[..., -1:, :]
        via_attention, _ = favor.attention(qt, kt, vt, fm, causal=True, initial_state=state, return_state=True)
        via_step, _ = favor.step(state, qt[..., 0, :], kt[..., 0, :], vt[..., 0, :], fm)
        err = (via_attention[..., 0, :] - via_step).abs().max().item()
        if err > 1e-5:
            raise SystemExit(f"refusing to time: the two paths differ by {err:.2e}")
        calls = {
            "attention_1_token": lambda: favor.attention(
                qt, kt, vt, fm, causal=True, initial_state=state, return_state=True
            ),
            "step": lambda: favor.step(state, qt[..., 0, :], kt[..., 0, :], vt[..., 0, :], fm),
        }
        times = {name: [] for name in calls}
        for _ in range(20):  # warm-up
            for f in calls.values():
                f()
        for _ in range(args.tokens):
            for name, f in calls.items():
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                f()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
    med = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    ratio = med["attention_1_token"] / med["step"]
    print(
        f"favor.attention, 1 token: {1e6 * med['attention_1_token']:.0f} us; favor.step: {1e6 * med['step']:.0f} us; ratio {ratio:.2f}x (max |diff| {err:.1e})"
    )
    write_json("step_path", {"machine": info, "median_s": med, "ratio": ratio, "max_abs_diff": err})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
