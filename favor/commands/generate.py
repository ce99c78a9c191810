"""favor generate: sample a continuation (protein or text) from a trained checkpoint."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="run directory or checkpoint directory")
    parser.add_argument(
        "--prompt", help="residue letters (default M) or, for a text checkpoint, any text (default 'The ')"
    )
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--stop-at-eos", action="store_true", help="cut the output at the first end-of-protein token")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..data import ProteinTokenizer, load_tokenizer
    from ..models import PerformerLM
    from ..training.checkpoint import CheckpointError, load_checkpoint
    from ..training.loop import load_lm

    try:
        model, config = load_lm(args.checkpoint)
        data_format = load_checkpoint(args.checkpoint).trainer.get("extra", {}).get("data_format", "fasta")
    except CheckpointError as e:
        print(f"favor generate: {e}")
        return 2
    if not isinstance(model, PerformerLM):
        print(f"favor generate: {args.checkpoint} holds a masked LM (objective 'masked'); only causal LMs generate")
        return 2
    generator = torch.Generator().manual_seed(args.seed)
    model.eval()
    if data_format == "text":
        try:
            tok = load_tokenizer(config["train"].get("tokenizer"))
        except (FileNotFoundError, ImportError) as e:
            print(f"favor generate: {e}")
            return 2
        prompt = "The " if args.prompt is None else args.prompt
        idx = torch.from_numpy(tok.encode(prompt))[None]
        if idx.shape[1] == 0:
            print(f"favor generate: --prompt must hold at least one token, got {prompt!r}")
            return 2
        out = model.generate(
            idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, generator=generator
        )
        print(tok.decode(out[0]))
        return 0
    tok = ProteinTokenizer()
    prompt = "M" if args.prompt is None else args.prompt
    if not prompt or not prompt.isalpha():
        print(f"favor generate: --prompt must be residue letters, got {prompt!r}")
        return 2
    idx = tok.encode(prompt.upper(), bos=True)[None]
    out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, generator=generator)[
        0, 1:
    ]
    if args.stop_at_eos:
        ends = (out == tok.eos_id).nonzero()
        if len(ends):
            out = out[: int(ends[0])]
    print(tok.decode(out))
    return 0
