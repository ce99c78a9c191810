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
}
