"""Every training experiment's --quick mode, end to end through the CLI: the JSON, table and
plot are written, every non-diverged curve is finite, and the table names each variant."""

from __future__ import annotations

import json
import math

import pytest

from favor.cli import main
from favor.paper import EXPERIMENTS

TRAINING = [name for name in ("books", "proteins", "pixels", "transfer", "long-proteins") if name in EXPERIMENTS]


@pytest.mark.parametrize("name", TRAINING)
def test_quick_mode_writes_finite_curves_for_every_variant(name, tmp_path, capsys):
    assert main(["paper", name, "--quick", "--out", str(tmp_path)]) == 0
    stem = name.replace("-", "_")
    data = json.loads((tmp_path / f"{stem}.json").read_text())
    table = (tmp_path / f"{stem}.md").read_text()
    assert (tmp_path / f"{stem}.png").stat().st_size > 10_000
    assert data["runs"], "no run was trained"
    for run in data["runs"]:
        assert run["variant"]["name"] in table
        if run["diverged_at"] is None:
            assert run["curve"][-1]["step"] > 0
            for point in run["curve"]:
                assert all(math.isfinite(point[k]) for k in ("loss", "accuracy", "perplexity", "bits")), point
    # the exact-softmax reference never diverges, and FAVOR+ with redraw neither
    names = {r["variant"]["name"]: r for r in data["runs"]}
    for must in [n for n in names if any(w in n for w in ("exact", "FAVOR+ redraw", "Performer-softmax"))]:
        assert names[must]["diverged_at"] is None, must


def test_books_causal_mode_scores_bits_per_byte_with_the_hybrid(tmp_path):
    # `favor paper books --objective causal`: causal byte LMs, held-out bits per byte; the
    # hybrid Performer (exact window + sinks) is among the variants and Linformer (no causal
    # mode) is not
    assert main(["paper", "books", "--quick", "--objective", "causal", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "books_causal.json").read_text())
    assert data["config"]["objective"] == "causal" and data["config"]["mask_rate"] is None
    names = {r["variant"]["name"]: r for r in data["runs"]}
    hybrid = next(r for n, r in names.items() if n.startswith("hybrid"))
    assert hybrid["variant"]["window"] > 0 and hybrid["variant"]["sinks"] > 0
    assert "Linformer" not in names
    for r in names.values():
        assert all(math.isfinite(p["bits"]) for p in r["curve"])
    assert "bits/byte" in (tmp_path / "books_causal.md").read_text()


def test_every_training_experiment_has_the_hybrid_performer():
    from favor.paper import books, pixels, proteins, transfer

    for variants in (books.VARIANTS, proteins.VARIANTS, pixels.variants(2), [transfer.HYBRID]):
        assert any(v.window > 0 and v.attention == "favor" for v in variants)


def test_books_far_gain_probes_run_only_when_named():
    from favor.paper import books

    assert books.pick_variants(None) is None  # the default run: VARIANTS, no probes
    assert not any(v.far_gain is not None for v in books.VARIANTS)
    got = books.pick_variants("softmax (exact),hybrid FAVOR+ far gain -4 (W=64 S=4)")
    assert [v.far_gain for v in got] == [None, -4.0] and got[1].window == 64 and got[1].sinks == 4
    with pytest.raises(ValueError, match="unknown names"):
        books.pick_variants("hybrid FAVOR+ far gain 3 (W=64 S=4)")
