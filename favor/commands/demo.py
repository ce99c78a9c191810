"""favor demo: what favor is, as tables with units and a one-line caption each (2-3 minutes
on 2 cores): (a) approximation, (b) speed and memory, (c) a byte-level English language
model at a long context, hybrid Performer vs softmax, (d) decoding cost per token.
JSON and PNG go to --out (default runs/demo/). This module parses the options and calls
``favor.training.demo.run_demo``, which holds the demo.
"""

from __future__ import annotations

from ..training.demo import run_demo


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    parser.add_argument("--lengths", default="1024,4096,16384", help="sequence lengths for the speed table")
    parser.add_argument("--lm-seconds", type=float, default=90.0, help="time budget of the LM comparison (0 skips it)")
    parser.add_argument("--lm-context", type=int, default=8192, help="bytes per training sequence in (c)")
    parser.add_argument("--skip-speed", action="store_true", help="skip the speed and memory table")


def run(args) -> int:
    run_demo(
        args.out,
        lengths=[int(x) for x in args.lengths.split(",")],
        lm_seconds=args.lm_seconds,
        lm_context=args.lm_context,
        skip_speed=args.skip_speed,
        echo=print,
    )
    return 0
