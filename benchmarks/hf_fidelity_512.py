"""Where MiniLM's swap loses fidelity at 512 tokens: per layer and head, near keys vs far keys.

For each attention layer of a performerized MiniLM, on the softmax model's own q, k, v of
held-out passages packed to ``--length`` tokens, the estimated attention matrix A^ is read off
exactly by running the layer's FAVOR path with one-hot values (v = I, so out = A^), and
compared with softmax's A:

- ``err``: |A^ v - A v| / |A v| (the layer's relative output error, v the real values);
- ``far mass``: softmax's weight outside the exact set (neighbours within W, S sinks);
- ``err near`` / ``err far``: the same error with A^ - A kept only on the exact / far keys
  (near keys are exact up to the normaliser, so their error is the far mass's misestimate);
- ``err, far mass right``: A on the exact set and A^'s far row rescaled to A's far mass,
  i.e. what is left when only the far weights' shape is wrong.

``python -m benchmarks.hf_fidelity_512 [--fit-steps 40] [--length 512] [--passages 4]``
(one thread; needs the extra ``hf-models``). Writes a JSON next to --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch


def _measure(model, batches, window, sinks):
    from favor.hf.fit import record_attention
    from favor.hf.interface import favor_attention_forward
    from favor.ops.local.window import exact_positions

    rows = []
    for layer, (module, calls) in enumerate(record_attention(model, batches).items()):
        acc = None
        for q, k, v, mask, scaling, is_causal, _ref, keep in calls:
            b, h, length, _ = q.shape
            eye = torch.eye(length).expand(b, h, length, length)
            with torch.no_grad():
                a_hat, _ = favor_attention_forward(module, q, k, eye, mask, scaling=scaling, is_causal=is_causal)
                a_hat = a_hat.transpose(1, 2).double()  # (B, H, L, L)
                logits = (q.double() @ k.double().transpose(-1, -2)) * scaling
                if mask is not None:
                    logits = logits + mask.double()
                a = torch.softmax(logits, -1)
            index, ok = exact_positions(length, window, sinks)
            near = torch.zeros(length, length, dtype=torch.bool)
            near[torch.arange(length)[:, None].expand_as(index)[ok], index[ok]] = True
            vd = v.double()
            out = a @ vd
            diff = a_hat - a
            e_all = diff @ vd
            e_near = diff.masked_fill(~near, 0.0) @ vd
            e_far = diff.masked_fill(near, 0.0) @ vd
            far_true = a.masked_fill(near, 0.0)
            far_hat = a_hat.masked_fill(near, 0.0)
            rescaled = far_hat * (far_true.sum(-1, keepdim=True) / far_hat.sum(-1, keepdim=True).clamp_min(1e-30))
            e_shape = (rescaled - far_true) @ vd
            w = (
                keep[:, None, :, None].double()
                if keep is not None
                else torch.ones(b, 1, length, 1, dtype=torch.float64)
            )
            parts = {
                "ref": (out**2 * w).sum((0, 2, 3)),
                "err": (e_all**2 * w).sum((0, 2, 3)),
                "near": (e_near**2 * w).sum((0, 2, 3)),
                "far": (e_far**2 * w).sum((0, 2, 3)),
                "shape": (e_shape**2 * w).sum((0, 2, 3)),
                "farmass": (far_true.sum(-1, keepdim=True) * w).sum((0, 2, 3)),
                "farmass_hat": (far_hat.sum(-1, keepdim=True) * w).sum((0, 2, 3)),
                "n": w.sum((0, 2, 3)).expand(h),
            }
            acc = parts if acc is None else {k: acc[k] + parts[k] for k in acc}
        head = {
            "err": (acc["err"] / acc["ref"]).sqrt(),
            "err_near": (acc["near"] / acc["ref"]).sqrt(),
            "err_far": (acc["far"] / acc["ref"]).sqrt(),
            "err_far_shape": (acc["shape"] / acc["ref"]).sqrt(),
            "far_mass": acc["farmass"] / acc["n"],
            "far_mass_hat": acc["farmass_hat"] / acc["n"],
        }
        total = {
            "err": float((acc["err"].sum() / acc["ref"].sum()).sqrt()),
            "err_near": float((acc["near"].sum() / acc["ref"].sum()).sqrt()),
            "err_far": float((acc["far"].sum() / acc["ref"].sum()).sqrt()),
            "err_far_shape": float((acc["shape"].sum() / acc["ref"].sum()).sqrt()),
            "far_mass": float(acc["farmass"].sum() / acc["n"].sum()),
            "far_mass_hat": float(acc["farmass_hat"].sum() / acc["n"].sum()),
        }
        rows.append({"layer": layer, **total, "heads": {k: [round(float(x), 4) for x in t] for k, t in head.items()}})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, action="append", help="tokens per passage (default 128 and 512)")
    p.add_argument("--passages", type=int, default=4)
    p.add_argument("--kernel", default="derf")
    p.add_argument("--num-features", type=int, default=256)
    p.add_argument("--exact-window", type=int, default=8)
    p.add_argument("--exact-sinks", type=int, default=1)
    p.add_argument("--key-shift", default="sequence")
    p.add_argument("--fit-steps", type=int, default=0)
    p.add_argument("--fit-length", type=int, default=64, help="tokens per fitting passage (default 64, as distill)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/fidelity_512.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import favor.hf as fh
    from favor.data.kjv import load_text
    from favor.hf.fidelity import embedding_cosine, packed_texts, tokenize_batches
    from favor.hf.fit import fit_adapters
    from favor.hf.models import load_softmax

    t0 = time.perf_counter()
    base, tok, _ = load_softmax("minilm")
    train, held = load_text("train"), load_text("heldout")
    cal = tokenize_batches(tok, train[:32], max_length=128)
    model = fh.performerize(
        copy.deepcopy(base),
        kernel=args.kernel,
        num_features=args.num_features,
        calibration=cal,
        key_shift=args.key_shift,
        exact_window=args.exact_window,
        exact_sinks=args.exact_sinks,
        exact_block=1,  # the window alone (blocks: favor performerize --exact-block)
    )
    if args.fit_steps:
        fb = tokenize_batches(
            tok, packed_texts(tok, train, length=args.fit_length, count=16), batch_size=8, max_length=args.fit_length
        )
        fit_adapters(model, fb[:2], steps=args.fit_steps)
    result = {"args": vars(args), "lengths": {}}
    for length in args.length or [128, 512]:
        ev = tokenize_batches(
            tok, packed_texts(tok, held, length=length, count=args.passages), batch_size=2, max_length=length
        )
        cos = embedding_cosine(model, ev)
        rows = _measure(model, ev, args.exact_window, args.exact_sinks)
        result["lengths"][length] = {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "layers": rows}
        print(f"L={length}: cosine {float(cos.mean()):.4f} (min {float(cos.min()):.4f})")
        print("layer   err  near   far  far-shape  far-mass  far-mass-est  worst heads (err)")
        for r in rows:
            worst = sorted(range(len(r["heads"]["err"])), key=lambda i: -r["heads"]["err"][i])[:3]
            ws = " ".join(f"h{i}:{r['heads']['err'][i]:.2f}" for i in worst)
            print(
                f"{r['layer']:>5} {r['err']:.3f} {r['err_near']:.3f} {r['err_far']:.3f} {r['err_far_shape']:9.3f}"
                f" {r['far_mass']:9.3f} {r['far_mass_hat']:13.3f}  {ws}"
            )
    result["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{result['seconds']} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
