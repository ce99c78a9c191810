"""favor distill for a causal LM: the decoder recipe (favor.hf.linearize), as flags.

``favor distill --model smollm2 --out DIR`` (or ``--gguf FILE``, a local causal-LM directory,
``--quick`` for a tiny random decoder): performerize (derf, M=256, exact window 512 + 4 sinks),
attention transfer per layer, fine-tuning of FAVOR's adapters (far gain at its own rate) on the teacher's
next-token distribution over packed 1,024-token passages of favor.data.english's training mix
(or --text: a domain, a file, several joined with '+'), all within --minutes (default 30,
evaluations included). Writes the model (favor.hf.from_pretrained), its tokenizer,
distill.json and distill.png into --out: held-out perplexity (python-docs, never trained on,
or --heldout; --samples passages per length) at --eval-length tokens (default 512 and 2,048;
8,192 too from --minutes 60) for softmax, zero-shot and distilled, KL and top-1 agreement with
the teacher, passkey accuracy at --passkey-length tokens (default 1,024 and 4,096).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from favor.data.english import text_passages
from favor.data.models import CAUSAL_LMS, load_causal_lm, tiny_causal_lm

#: held-out lengths reported by default, and the one added when the budget allows
DECODER_EVAL_LENGTHS = (512, 2048)
LONG_EVAL_LENGTH, LONG_EVAL_MINUTES = 8192, 60.0


def add_decoder_arguments(parser) -> None:
    parser.add_argument(
        "--passkey-length",
        type=int,
        action="append",
        help="decoder: passkey prompt tokens; repeat for several (default 1024 and 4096; 0: none)",
    )
    parser.add_argument("--passkey-trials", type=int, help="decoder: passkey prompts per length (default 3)")
    parser.add_argument(
        "--tie-keys",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="decoder: one key shift, key map and dense a per key/value group (GQA; the default); decoding "
        "then keeps the far state once per key/value head (a third of the far state; SmolLM2: the same "
        "perplexity, faster tokens); --no-tie-keys: per query head",
    )
    parser.add_argument(
        "--transfer-share",
        type=float,
        help="decoder: share of the training time for attention transfer (default 0.1; 0: skip it)",
    )


def is_decoder(args) -> bool:
    """Whether ``args`` ask for the decoder recipe: --quick, --gguf, a packaged causal LM's name,
    or a directory whose config names a causal-LM architecture (not already performerized)."""
    if args.quick or args.gguf:
        return True
    if args.model is None:
        return False
    if args.model in CAUSAL_LMS:
        return True
    path = Path(args.model)
    config = path / "config.json"
    if not config.is_file() or (path / "favor.json").is_file():
        return False
    try:
        architectures = json.loads(config.read_text()).get("architectures") or []
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)


def _load(args):
    """(teacher, tokenizer, name) or None after printing why not."""
    if args.quick:
        return (*tiny_causal_lm(args.seed), "tiny random Llama (--quick)")
    spec = args.gguf or args.model
    try:
        model, tok = load_causal_lm(spec)
    except (ImportError, FileNotFoundError) as e:
        print(f"favor distill: {e}")
        return None
    return model, tok, str(spec)


def _config(args):
    from favor.hf.linearize import QUICK, LinearizeConfig

    base = dict(QUICK) if args.quick else {}
    given = {
        "minutes": args.minutes,
        "steps": args.steps,
        "length": args.max_length,
        "batch_size": args.batch_size,
        "fit_passages": args.fit_batches,
        "fit_steps": args.fit_steps,
        "transfer_share": args.transfer_share,
        "train": args.train,
        "lr": args.lr,
        "adapter_lr": args.adapter_lr,
        "gain_lr": args.gain_lr,
        "attention_weight": args.attention_weight,
        "schedule": args.schedule,
        "kernel": args.kernel,
        "num_features": args.num_features if args.num_features != 256 or not args.quick else None,
        "exact_window": -1 if args.plain else args.exact_window,
        "exact_sinks": 0 if args.plain else args.exact_sinks,
        "exact_block": args.exact_block,
        "passkey_trials": args.passkey_trials,
        "tie_keys": args.tie_keys,
        "seed": args.seed,
    }
    if args.eval_length:
        given["eval_lengths"] = tuple(args.eval_length)
    elif not args.quick:
        minutes = args.minutes or LinearizeConfig.minutes
        long = (LONG_EVAL_LENGTH,) if minutes >= LONG_EVAL_MINUTES else ()
        given["eval_lengths"] = DECODER_EVAL_LENGTHS + long
    if args.samples is not None:
        given["eval_passages"] = (args.samples,)
    if args.passkey_length:
        given["passkey_lengths"] = tuple(n for n in args.passkey_length if n)
    return LinearizeConfig(**{**base, **{k: v for k, v in given.items() if v is not None}})


def _texts(tok, args, length: int):
    """(training ids or None for the built-in mix, its name, held-out texts or None for the
    default python-docs, their name), from --text and --heldout (names, files, '+' mixes)."""
    from favor.hf.models import causal_texts

    ids = None
    if args.text not in (None, "train", "english"):
        ids = text_passages(tok, causal_texts(args.text), length=length, name=f"--text {args.text}")
    if args.heldout and len(args.heldout) > 1:
        raise ValueError(f"a decoder takes one --heldout text (a name, a file, or a '+' mix), got {list(args.heldout)}")
    heldout = causal_texts(args.heldout[0]) if args.heldout else None
    return ids, args.text, heldout, (args.heldout[0] if args.heldout else None)


def run(args) -> int:
    import favor.hf as fh
    from favor.hf.linearize import linearize, plot_report, summary

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    try:
        config = _config(args)
    except ValueError as e:
        print(f"favor distill: {e}")
        return 2
    loaded = _load(args)
    if loaded is None:
        return 2
    teacher, tok, name = loaded
    if getattr(args, "corpus", "english") != "english":
        print("favor distill: a decoder trains on the english mix (--corpus english) or --text FILE")
        return 2
    try:
        text_ids, text_name, heldout, heldout_name = _texts(tok, args, config.length)
    except (OSError, ValueError) as e:
        print(f"favor distill: {e}")
        return 2
    print(f"favor distill: linearizing {name} within {config.minutes:g} minutes")

    def stage(s: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {s}", flush=True)

    def on_step(step: int, loss: float) -> None:
        if step == 1 or step % 5 == 0:
            print(f"[{time.perf_counter() - t0:6.0f} s] step {step}: KL {loss:.4f}", flush=True)

    try:
        student, report = linearize(
            teacher,
            tok,
            config,
            text_ids=text_ids,
            text_name=text_name,
            heldout=heldout,
            heldout_name=heldout_name,
            on_step=on_step,
            stage=stage,
        )
    except ValueError as e:
        print(f"favor distill: {e}")
        return 2
    out = Path(args.out)
    fh.save_pretrained(student, out)
    tok.save_pretrained(out)

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    report = {"model": name, **report, "wall_seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(peak)}
    (out / "distill.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_report(report, out / "distill.png", title=f"{name}: linearized with favor")
    for line in summary(report):
        print(line)
    print(f"saved {out} (favor.hf.from_pretrained, favor generate --model), {out / 'distill.json'}, distill.png")
    return 0
