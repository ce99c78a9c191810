"""The Performer paper, regenerated: one module per figure or experiment.

Each module holds a pure function that returns its results (dicts of numbers) and a thin
``add_arguments(parser)`` / ``run(args) -> int`` pair that ``favor paper NAME`` calls. The
table below maps names to modules, imported only when chosen so that ``favor paper --help``
stays fast. Every entry takes ``--quick`` (seconds; the tests run it) and ``--out DIR``.
"""

from __future__ import annotations

#: name -> (module under favor.paper, one-line help)
EXPERIMENTS: dict[str, tuple[str, str]] = {
    "mse-ratio": ("mse_ratio", "Fig. 2: MSE(trig) / MSE(positive), Lemma 2's closed form vs favor's Monte Carlo"),
    "feature-error": ("feature_error", "Fig. 4: attention-output MSE vs M per projection and feature map"),
    "speed": ("speed", "Fig. 3 / App. E: whole-model forward+backward time and memory vs L, to the X line"),
    "books": (
        "books",
        "Fig. 5 right: masked LM on books, softmax vs FAVOR+ variants (redraw, SMREG, trig, ReLU, FAVOR++)",
    ),
    "proteins": (
        "proteins",
        "Table 2: Swiss-Prot LM, uni- and bidirectional, exact vs Performer-ReLU vs softmax, test and OOD",
    ),
    "pixels": (
        "pixels",
        "Fig. 7: MNIST as 784-pixel sequences, bits/dim: Performer-ReLU/softmax, SMREG, exact, Reformer x2 depth",
    ),
    "transfer": (
        "transfer",
        "Fig. 5 left: softmax masked-LM weights loaded into FAVOR+ and fine-tuned, vs FAVOR+ from scratch",
    ),
    "long-proteins": (
        "long_proteins",
        "Fig. 7: proteins at L=8192, Performer vs the deepest exact model as fast, equal wall time",
    ),
}
