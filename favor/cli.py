"""The ``favor`` command line: ``favor <subcommand> [options]``.

Each subcommand lives in ``favor/commands/<name>.py`` with ``add_arguments(parser)`` and
``run(args) -> int``; this table maps names to those modules, imported only when used so
that ``favor --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

import torch

from . import __version__

#: subcommand -> (module under favor.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "bench": (
        "bench",
        "time and peak memory vs L: favor vs SDPA (and performer-pytorch); JSON + PNG under runs/bench/",
    ),
    "demo": ("demo", "approximation, speed and memory tables vs exact attention; JSON + PNG under runs/demo/"),
    "train": ("train", "train a Performer LM on text or proteins (--data; checkpoints, exact --resume, --minutes)"),
    "generate": ("generate", "sample a protein or text continuation from a trained checkpoint"),
    "data": ("data", "fetch the full Swiss-Prot set (Debian metastudent-data) for long runs"),
    "performerize": ("performerize", "swap softmax for FAVOR in a pretrained HF model; fidelity JSON + PNG"),
    "distill": ("distill", "fine-tune a performerized HF model to match its softmax self; saves it"),
    "paper": ("paper", "regenerate the Performer paper's figures and experiments (favor paper NAME --quick)"),
}


def build_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the ``chosen`` subcommand's module is imported to add its options."""
    parser = argparse.ArgumentParser(prog="favor", description="Performer (FAVOR+) attention for PyTorch")
    parser.add_argument("--version", action="version", version=f"favor {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument(
        "--keep-denormals",
        action="store_true",
        help="keep subnormal floats (by default a command flushes them to zero on CPU: sharp softmax rows make "
        "millions of them, and x86 computes each one far slower)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(f"favor.commands.{module}").add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = next((a for a in argv if a in COMMANDS), None)
    args = build_parser(chosen).parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    module = importlib.import_module(f"favor.commands.{COMMANDS[args.command][0]}")
    flush = not args.keep_denormals
    if flush:
        # exp of logits more than ~87 below a row's maximum lands in float32's subnormal range;
        # as an exact model's attention sharpens in training, its CPU step slowed ~4x on them
        # (docs/paper.md, "Subnormal floats"). Flushed, those weights are 0 instead of < 1.2e-38.
        flush = torch.set_flush_denormal(True)
    try:
        return int(module.run(args) or 0)
    finally:
        if flush:  # an in-process caller gets torch's default back
            torch.set_flush_denormal(False)


if __name__ == "__main__":
    raise SystemExit(main())
