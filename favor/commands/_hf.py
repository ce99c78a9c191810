"""What `favor performerize` and `favor distill` share: loading the softmax model, the feature options.

The text splits and held-out lengths both use are favor.hf.fidelity's.
"""

from __future__ import annotations

import torch


def load_softmax_or_report(spec: str, *, seed: int):
    """(model, tokenizer, kind) after seeding torch's global RNG with ``seed`` (what each
    command does first), or None after printing why ``spec`` cannot be used."""
    from favor.hf.models import load_softmax

    torch.manual_seed(seed)
    try:
        return load_softmax(spec)
    except ValueError as e:
        print(e)
        return None


def run_on_softmax(args, command: str, recipe, config_cls, given: dict, **hooks) -> tuple[int, object]:
    """What `favor performerize` and `favor distill --model` do around their library call:
    load --model (seeded by --seed), build ``config_cls`` from ``given`` (None: its default)
    and the feature options, and run ``recipe(model, tokenizer, kind, config, out=args.out,
    name=args.model, echo=print, **hooks)``. Returns (exit code, the recipe's result); a
    ValueError is printed as ``favor COMMAND: ...`` with exit code 2."""
    loaded = load_softmax_or_report(args.model, seed=args.seed)
    if loaded is None:
        return 2, None
    model, tok, kind = loaded
    try:
        config = config_cls(**{k: v for k, v in given.items() if v is not None}, features=feature_options(args))
        return 0, recipe(model, tok, kind, config, out=args.out, name=str(args.model), echo=print, **hooks)
    except ValueError as e:
        print(f"favor {command}: {e}")
        return 2, None


def hf_defaults():
    """favor.hf's defaults (favor.hf.performerize.DEFAULTS): the commands use the library's."""
    from favor.hf.performerize import DEFAULTS

    return DEFAULTS


def add_feature_arguments(parser) -> None:
    """Options for how performerize draws and places the features (both commands); what is
    not given takes favor.hf.performerize's defaults (``--plain``: its ``plain=True``)."""
    d = hf_defaults()
    parser.add_argument("--projection", default="orthogonal", help="orthogonal (default), simplex or iid")
    parser.add_argument(
        "--key-shift",
        help=f"{d['key_shift']} (default: per sequence), pair (calibrated constant; the --plain default), keys, none",
    )
    parser.add_argument(
        "--exact-window",
        type=int,
        help=f"exact weights for keys within W positions of each query, FAVOR for the rest "
        f"(default {d['exact_window']}; -1: none, the --plain default)",
    )
    parser.add_argument(
        "--exact-sinks",
        type=int,
        help=f"exact weights for the first N tokens too (default {d['exact_sinks']}; --plain: 0)",
    )
    parser.add_argument(
        "--exact-block",
        type=int,
        help=f"exact weights for each query's whole block of C positions, widened by the window "
        f"(default {d['exact_block']}; 1: the window alone; --plain: 1)",
    )
    parser.add_argument(
        "--plain",
        action="store_true",
        help="the paper's estimator: no exact terms and the calibrated constant key shift "
        "(with --kernel positive: FAVOR+, with --kernel oprf: FAVOR++)",
    )


def feature_options(args, *, causal: bool = False) -> dict:
    """performerize's keyword arguments from the options of ``add_feature_arguments``: what
    was given, else favor.hf.performerize's defaults (``--plain``: its ``plain=True``;
    ``causal``: a decoder, no exact blocks unless given)."""
    from favor.hf.performerize import feature_defaults

    given = {k: getattr(args, k) for k in ("key_shift", "exact_window", "exact_sinks", "exact_block")}
    options = feature_defaults(plain=getattr(args, "plain", False), causal=causal, **given)
    del options["kernel"]  # each command chooses its kernel(s): --kernel
    return {"projection": args.projection, **options}
