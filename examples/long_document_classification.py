"""Classify long documents with a bidirectional Performer encoder (PerformerEncoder).

    python examples/long_document_classification.py --data docs.tsv --length 8192
    python examples/long_document_classification.py              # a synthetic stand-in task

--data is a TSV file, one document a line: ``label<TAB>text``. Text is read as bytes
(vocabulary 256 + padding), documents are cut to --length and padded per batch with a
key-padding mask (padded keys count in neither FAVOR's numerator nor its normaliser, so a
document's prediction does not depend on what it is batched with). The encoder's hidden
states are mean-pooled over real tokens and a linear head predicts the label. Attention is
linear in --length: 8k-32k byte documents train on a CPU.

Without --data: documents of random bytes, 50-100 % of --length long, each with a few
"topic" bytes of its class scattered anywhere in it; the label is the class.
"""

from __future__ import annotations

import argparse
import random

import torch
import torch.nn.functional as F
from torch import nn

from favor.models import PerformerConfig, PerformerEncoder

PAD = 256


class Classifier(nn.Module):
    def __init__(self, config: PerformerConfig, num_classes: int) -> None:
        super().__init__()
        self.encoder = PerformerEncoder(config)
        self.head = nn.Linear(config.dim, num_classes)

    def forward(self, tokens: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(tokens, key_padding_mask=padding)  # (B, L, dim)
        keep = (~padding)[..., None].to(hidden.dtype)
        pooled = (hidden * keep).sum(1) / keep.sum(1).clamp_min(1.0)
        return self.head(pooled)


def synthetic(n: int, length: int, classes: int, seed: int) -> list[tuple[int, bytes]]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        label = rng.randrange(classes)
        body = bytearray(rng.randrange(32, 200) for _ in range(rng.randint(length // 2, length)))
        for _ in range(4):  # the class's topic bytes 200 + 8*label ... 200 + 8*label + 7
            body[rng.randrange(len(body))] = 200 + 8 * label + rng.randrange(8)
        docs.append((label, bytes(body)))
    return docs


def read_tsv(path: str) -> list[tuple[int, bytes]]:
    docs = []
    with open(path, "rb") as f:
        for line in f:
            label, _, text = line.rstrip(b"\n").partition(b"\t")
            docs.append((int(label), text))
    return docs


def collate(docs: list[tuple[int, bytes]], length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cut = [d[:length] for _, d in docs]
    n = max(len(d) for d in cut)
    tokens = torch.full((len(docs), n), PAD)
    for i, d in enumerate(cut):
        tokens[i, : len(d)] = torch.tensor(list(d))
    return tokens, tokens == PAD, torch.tensor([label for label, _ in docs])


@torch.no_grad()
def accuracy(model: Classifier, docs, length: int, batch_size: int) -> float:
    model.eval()
    right = 0
    for i in range(0, len(docs), batch_size):
        tokens, padding, labels = collate(docs[i : i + batch_size], length)
        right += int((model(tokens, padding).argmax(-1) == labels).sum())
    model.train()
    return right / len(docs)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="TSV: label<TAB>text per line (default: the synthetic task)")
    p.add_argument("--length", type=int, default=4096, help="tokens (bytes) per document, at most")
    p.add_argument("--classes", type=int, default=4, help="classes of the synthetic task")
    p.add_argument("--documents", type=int, default=512, help="documents of the synthetic task")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--num-features", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    docs = read_tsv(args.data) if args.data else synthetic(args.documents, args.length, args.classes, args.seed)
    random.Random(args.seed).shuffle(docs)
    n_val = max(1, len(docs) // 5)
    val, train = docs[:n_val], docs[n_val:]
    num_classes = max(label for label, _ in docs) + 1
    cfg = PerformerConfig(
        vocab_size=PAD + 1,
        dim=args.dim,
        depth=args.depth,
        heads=args.heads,
        num_features=args.num_features,
        max_len=args.length,
        seed=args.seed,
    )
    model = Classifier(cfg, num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    rng = random.Random(args.seed + 1)
    for step in range(1, args.steps + 1):
        tokens, padding, labels = collate(rng.sample(train, min(args.batch_size, len(train))), args.length)
        loss = F.cross_entropy(model(tokens, padding), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, args.steps // 10) == 0:
            print(f"step {step:5d}  loss {float(loss.detach()):.3f}")
    acc = accuracy(model, val, args.length, args.batch_size)
    print(f"held-out accuracy {acc:.3f} on {len(val)} documents ({num_classes} classes, chance {1 / num_classes:.3f})")
    return {"accuracy": acc, "num_classes": num_classes, "model": model}


if __name__ == "__main__":
    main()
