"""What `favor performerize` and `favor distill` share: loading the softmax model, text splits, lengths."""

from __future__ import annotations

#: tokens per sequence for a protein masked LM: a whole antibody V region (~110-130 residues)
MASKED_LM_LENGTH = 160


def load_softmax_or_report(spec: str):
    """(model, tokenizer, kind), or None after printing why ``spec`` cannot be used."""
    from favor.hf.models import load_softmax

    try:
        return load_softmax(spec)
    except ValueError as e:
        print(e)
        return None


def max_length(given: int | None, kind: str, default: int) -> int:
    """``given``, else a whole V region for a masked LM, else ``default``."""
    if given is not None:
        return given
    return MASKED_LM_LENGTH if kind == "masked-lm" else default


def texts(split: str, kind: str, limit: int | None = None) -> list[str]:
    """The first ``limit`` texts of a built-in split or file, as the model reads them."""
    from favor.hf.models import builtin_texts, model_texts

    return model_texts(builtin_texts(split, kind)[:limit], kind)


def add_feature_arguments(parser) -> None:
    """Options for how performerize draws and places the features (both commands)."""
    parser.add_argument("--projection", default="orthogonal", help="orthogonal (default), simplex or iid")
    parser.add_argument(
        "--key-shift", default="pair", help="pair (default: calibrated constant), sequence (per sequence), keys, none"
    )
    parser.add_argument(
        "--exact-window",
        type=int,
        default=-1,
        help="exact weights for keys within W positions of each query, FAVOR for the rest (default -1: none)",
    )
    parser.add_argument(
        "--exact-sinks", type=int, default=0, help="exact weights for the first N tokens too (default 0)"
    )


def feature_options(args) -> dict:
    """performerize's keyword arguments from the options of ``add_feature_arguments``."""
    return {
        "projection": args.projection,
        "key_shift": args.key_shift,
        "exact_window": args.exact_window,
        "exact_sinks": args.exact_sinks,
    }
