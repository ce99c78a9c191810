"""The picture of docs/attention.md: which keys each query takes exactly (ExactTerms), causal
and bidirectional. ``python -m benchmarks.exact_set_picture [OUT.png]``."""

from __future__ import annotations

import sys

from ._common import pyplot


def main(argv: list[str] | None = None) -> int:
    import torch

    import favor
    from favor.ops.local.spec import exact_mask

    out = (argv if argv is not None else sys.argv[1:]) or ["docs/img/exact_terms.png"]
    plt = pyplot()
    length = 24
    panels = [
        ("causal, W=3, S=2, C=1", favor.ExactTerms(3, 2, 1), True),
        ("causal, W=2, S=1, C=4", favor.ExactTerms(2, 1, 4), True),
        ("bidirectional, W=2, S=1, C=4", favor.ExactTerms(2, 1, 4), False),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.3))
    for ax, (title, terms, causal) in zip(axes, panels, strict=True):
        near = exact_mask(length, terms, causal=causal).float()
        seen = torch.ones(length, length).tril() if causal else torch.ones(length, length)
        img = seen * 0.35 + near * 0.65  # grey: FAVOR's estimate, dark: exact, white: not seen
        ax.imshow(img, cmap="Blues", vmin=0, vmax=1)
        ax.set_title(title)
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
    fig.suptitle("favor.ExactTerms: dark = exact softmax weight, light = FAVOR estimate, white = not attended")
    fig.tight_layout()
    fig.savefig(out[0], dpi=90)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
