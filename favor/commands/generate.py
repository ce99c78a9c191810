"""favor generate: sample a protein continuation from a trained checkpoint."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="run directory or checkpoint directory")
    parser.add_argument("--prompt", default="M", help="residue letters to continue (default M)")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--stop-at-eos", action="store_true", help="cut the output at the first end-of-protein token")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..data import ProteinTokenizer
    from ..training.checkpoint import CheckpointError
    from ..training.loop import load_lm

    try:
        model, _ = load_lm(args.checkpoint)
    except CheckpointError as e:
        print(f"favor generate: {e}")
        return 2
    tok = ProteinTokenizer()
    if not args.prompt or not args.prompt.isalpha():
        print(f"favor generate: --prompt must be residue letters, got {args.prompt!r}")
        return 2
    model.eval()
    idx = tok.encode(args.prompt.upper(), bos=True)[None]
    out = model.generate(
        idx,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        generator=torch.Generator().manual_seed(args.seed),
    )[0, 1:]
    if args.stop_at_eos:
        ends = (out == tok.eos_id).nonzero()
        if len(ends):
            out = out[: int(ends[0])]
    print(tok.decode(out))
    return 0
