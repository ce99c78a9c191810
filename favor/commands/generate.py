"""favor generate: sample a continuation (protein or text) from a trained checkpoint, or from a
Hugging Face causal LM directory (``--model DIR``: one that favor.hf.save_pretrained wrote, such as
``favor distill --model smollm2 --out DIR``, or a softmax one). With ``--model`` the prompt goes
through the tokenizer's chat template when it has one (``--raw``: as plain text), decoding is
greedy unless ``--temperature`` is given, and a performerized model keeps a constant-size
FavorCache."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..data import ProteinTokenizer, load_tokenizer
from ..data.models import load_causal_lm
from ..models import PerformerLM
from ..ops.local import native
from ..training.checkpoint import CheckpointError, load_checkpoint
from ..training.loop import load_lm


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="run directory or checkpoint directory (favor train)")
    source.add_argument("--model", help="a Hugging Face causal LM directory (favor distill --out, or softmax)")
    parser.add_argument(
        "--prompt",
        help="residue letters (default M) or, for a text checkpoint or --model, any text (default 'The ')",
    )
    parser.add_argument("--raw", action="store_true", help="--model: the prompt as plain text, no chat template")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--temperature", type=float, help="sampling temperature (checkpoints: default 1; --model: greedy unless given)"
    )
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--stop-at-eos", action="store_true", help="cut the output at the first end-of-protein token")


def prompt_ids(tok, prompt: str, *, raw: bool = False):
    """(1, L) token ids of ``prompt``: through the tokenizer's chat template (one user turn and
    the assistant's opening) when it has one and not ``raw``, else the text as it is."""
    if not raw and getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    else:
        ids = tok(prompt)["input_ids"]

    return torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)


def _run_hf(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    directory = Path(args.model)
    try:
        if (directory / "favor.json").is_file():
            import favor.hf as fh

            model = fh.from_pretrained(directory)
            tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        else:
            model, tok = load_causal_lm(args.model)
    except (OSError, ValueError, ImportError) as e:
        print(f"favor generate: {e}")
        return 2
    ids = prompt_ids(tok, "The " if args.prompt is None else args.prompt, raw=args.raw)
    if ids.shape[1] == 0:
        print(f"favor generate: --prompt must hold at least one token, got {args.prompt!r}")
        return 2
    sample = args.temperature is not None and args.temperature > 0
    options = dict(do_sample=True, temperature=args.temperature, top_k=args.top_k or 0) if sample else {}
    if (directory / "favor.json").is_file() and native.enabled():
        # built on first use (~25 s, then cached): said here, not left as a silent pause
        print("favor generate: loading the compiled decoding step (built once, ~25 s)", file=sys.stderr, flush=True)
        native.load()
    torch.manual_seed(args.seed)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=args.max_new_tokens,
            pad_token_id=pad,
            **({"do_sample": False} if not sample else options),
        )
    print(tok.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.model is not None:
        return _run_hf(args)
    if args.raw:
        print("favor generate: --raw is for --model (a chat template); a checkpoint takes its prompt as it is")
        return 2
    temperature = 1.0 if args.temperature is None else args.temperature

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
        out = model.generate(idx, args.max_new_tokens, temperature=temperature, top_k=args.top_k, generator=generator)
        print(tok.decode(out[0]))
        return 0
    tok = ProteinTokenizer()
    prompt = "M" if args.prompt is None else args.prompt
    if not prompt or not prompt.isalpha():
        print(f"favor generate: --prompt must be residue letters, got {prompt!r}")
        return 2
    idx = tok.encode(prompt.upper(), bos=True)[None]
    out = model.generate(idx, args.max_new_tokens, temperature=temperature, top_k=args.top_k, generator=generator)[
        0, 1:
    ]
    if args.stop_at_eos:
        ends = (out == tok.eos_id).nonzero()
        if len(ends):
            out = out[: int(ends[0])]
    print(tok.decode(out))
    return 0
