"""favor paper NAME: regenerate one of the Performer paper's figures or experiments.

The names and their modules are listed in ``favor.paper.EXPERIMENTS``; each module adds its
own options (always ``--quick`` and ``--out``) and runs.
"""

from __future__ import annotations

import importlib

from ..paper import EXPERIMENTS


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="experiment", metavar="NAME")
    sub.required = True
    for name, (module, help_text) in EXPERIMENTS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--quick", action="store_true", help="a few seconds' version (the tests run it)")
        p.add_argument("--out", default=f"runs/paper/{name}", help=f"output directory (default: runs/paper/{name})")
        # experiment modules keep heavy imports (torch, matplotlib) inside functions, so
        # importing each one to add its options stays cheap
        importlib.import_module(f"favor.paper.{module}").add_arguments(p)


def run(args) -> int:
    module = importlib.import_module(f"favor.paper.{EXPERIMENTS[args.experiment][0]}")
    return int(module.run(args) or 0)
