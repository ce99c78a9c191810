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


#: held-out lengths that both commands report for a sentence encoder: the built-in held-out
#: split packed (consecutive passages joined) to exactly this many tokens
EVAL_LENGTHS = (128, 512)


def eval_lengths(given: list[int] | None, kind: str, masked_lm_length: int, *, limit: int = 1 << 30) -> list[int]:
    """The held-out lengths to report: ``given``, else ``EVAL_LENGTHS`` capped at ``limit``
    (the model's positions; a masked LM: its own whole sequences, ``masked_lm_length``, not packed)."""
    if given:
        bad = [n for n in given if n < 3]
        if bad:
            raise ValueError(f"--eval-length must be >= 3 tokens, got {bad}")
        return list(given)
    if kind == "masked-lm":
        return [masked_lm_length]
    return list(dict.fromkeys(min(n, limit) for n in EVAL_LENGTHS))


def held_out_batches(tok, split: str, kind: str, *, length: int, count: int, batch_size: int = 16) -> list[dict]:
    """Tokenized held-out batches at ``length`` tokens: for a sentence encoder ``count``
    passages packed to exactly ``length`` tokens (fidelity.packed_documents: a passage is one
    domain's text), for a masked LM the
    first ``count`` sequences cut at ``length``."""
    from favor.hf.fidelity import packed_documents, tokenize_batches
    from favor.hf.models import builtin_documents

    if kind == "masked-lm":
        return tokenize_batches(tok, texts(split, kind, count), batch_size=batch_size, max_length=length)
    packed = packed_documents(tok, builtin_documents(split, kind), length=length, count=count)
    if not packed:
        raise ValueError(f"the {split!r} text is too short for one passage of {length} tokens")
    return tokenize_batches(tok, packed, batch_size=batch_size, max_length=length)


def _defaults():
    """favor.hf's defaults (favor.hf.performerize.DEFAULTS): the commands use the library's."""
    from favor.hf.performerize import DEFAULTS

    return DEFAULTS


def add_feature_arguments(parser) -> None:
    """Options for how performerize draws and places the features (both commands); what is
    not given takes favor.hf.performerize's defaults (``--plain``: its ``plain=True``)."""
    d = _defaults()
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
