"""Turn a Hugging Face encoder into a Performer, measure how close it stays to the softmax
model, distill it back, and save it.

    python examples/performerize_and_distill.py --model path/to/bert-like-model --out runs/performer
    python examples/performerize_and_distill.py --model tiny --out runs/tiny   # random weights, offline

Steps: (1) load the softmax teacher and a tokenizer; (2) ``favor.hf.performerize`` a copy,
calibrated on a few training batches (FAVOR's parameters are fitted to the layer's query
and key statistics; softmax is unchanged by the fit); (3) held-out cosine between the
student's and the teacher's mean-pooled embeddings; (4) ``favor.hf.distill.distill`` for
--steps steps (query/key projections and the adapters); (5) the cosine again; (6)
``favor.hf.save_pretrained`` (safetensors, no pickle), reloadable with
``favor.hf.from_pretrained``. Texts: --text FILE (one passage a line) or favor's built-in
King James Bible passages (training and held-out books are disjoint).
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

import favor.hf
from favor.data.kjv import load_text
from favor.hf.distill import DistillConfig, distill
from favor.hf.fidelity import embeddings, tokenize_batches


class ByteTokenizer:
    """For --model tiny: bytes as token ids (mod the vocabulary), padded per batch."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def __call__(self, texts, *, padding=True, truncation=True, max_length=128, return_tensors="pt"):
        ids = [[2 + b % (self.vocab_size - 2) for b in t.encode()][:max_length] for t in texts]
        n = max(len(x) for x in ids)
        input_ids = torch.tensor([x + [0] * (n - len(x)) for x in ids])
        mask = torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in ids])
        return {"input_ids": input_ids, "attention_mask": mask}


def load(model: str):
    import transformers

    if model == "tiny":
        cfg = transformers.BertConfig(
            vocab_size=128,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            initializer_range=0.2,  # larger logits than the default 0.02: FAVOR is visibly approximate
        )
        torch.manual_seed(0)
        return transformers.BertModel(cfg).eval(), ByteTokenizer(cfg.vocab_size)
    return transformers.AutoModel.from_pretrained(model).eval(), transformers.AutoTokenizer.from_pretrained(model)


def cosine(student, teacher, batches) -> torch.Tensor:
    """Per-passage cosine of the student's FAVOR embeddings to the teacher's softmax ones."""
    return (embeddings(teacher, batches, attn="sdpa") * embeddings(student, batches, attn=favor.hf.NAME)).sum(-1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="a local Hugging Face model directory, or 'tiny'")
    p.add_argument("--out", required=True, help="where the performerized model is saved")
    p.add_argument("--text", help="training passages, one a line (default: built-in KJV passages)")
    p.add_argument("--kernel", default="derf", help="positive, oprf or derf (dense-exponential)")
    p.add_argument("--num-features", type=int, default=256)
    p.add_argument("--exact-window", type=int, default=-1, help="exact attention within W positions (-1: none)")
    p.add_argument(
        "--exact-block",
        type=int,
        default=1,
        help="exact attention within blocks of C positions (bidirectional; 1: none)",
    )
    p.add_argument("--steps", type=int, default=300, help="distillation steps")
    p.add_argument("--max-seconds", type=float, default=540.0)
    p.add_argument("--train-passages", type=int, default=512)
    p.add_argument("--heldout-passages", type=int, default=64)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    teacher, tokenizer = load(args.model)
    train = load_text(args.text or "train")[: args.train_passages]
    held = load_text("heldout")[: args.heldout_passages]
    batches = tokenize_batches(tokenizer, train, batch_size=args.batch_size, max_length=args.max_length)
    ev = tokenize_batches(tokenizer, held, batch_size=32, max_length=args.max_length)

    local = {"exact_window": args.exact_window, "exact_sinks": 1 if args.exact_window >= 0 else 0}
    local |= {"exact_block": args.exact_block, "key_shift": "pair"}  # the calibrated constant shift
    student = favor.hf.performerize(
        copy.deepcopy(teacher),
        kernel=args.kernel,
        num_features=args.num_features,
        seed=args.seed,
        calibration=batches[:2],
        **local,
    )
    before = cosine(student, teacher, ev)
    print(f"zero-shot: held-out embedding cosine to softmax {before.mean():.4f} (min {before.min():.4f})")

    config = DistillConfig(
        steps=args.steps,
        max_seconds=args.max_seconds,
        lr=2.5e-4,
        schedule="cosine",
        train="query-key",
        attention_weight=1.0,
        seed=args.seed,
    )
    losses = distill(student, teacher, batches, config)
    after = cosine(student, teacher, ev)
    print(f"distilled ({len(losses)} steps): cosine {after.mean():.4f} (min {after.min():.4f})")

    out = favor.hf.save_pretrained(student, args.out)
    print(f"saved to {out}; load with favor.hf.from_pretrained({str(Path(args.out))!r})")
    return {
        "cosine_before": float(before.mean()),
        "cosine_after": float(after.mean()),
        "losses": losses,
        "student": student,
    }


if __name__ == "__main__":
    main()
