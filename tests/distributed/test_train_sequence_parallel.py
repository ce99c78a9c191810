"""train_sequence_parallel on 2 gloo processes equals favor.train.train in one process:
same batches (seeded by step), same schedule, clipping and redraws; the model is float64
so the parameters agree to round-off (1e-9 leaves a wide margin after a few AdamW steps)."""

from __future__ import annotations

from . import _spawn
from ._train_workers import train_worker


def test_sequence_parallel_training_matches_single_process():
    overrides = {
        "steps": 3,
        "seq_len": 33,
        "batch_size": 2,
        "eval_every": 2,
        "redraw_interval": 2,
        "checkpoint_every": 2,
    }
    r0, r1 = _spawn.run(train_worker, 2, overrides)
    assert r0["vs_single"] <= 1e-9, r0["vs_single"]
    assert abs(r0["loss"] - r0["single_loss"]) <= 1e-9
    assert r0["loss"] == r1["loss"]  # the global loss is all-reduced
    assert [r["step"] for r in r0["rows"]] == [1, 2, 3]
    assert r0["checkpoint"] == ["LATEST", "step_00000002", "step_00000003"]
    assert r0["log_lines"] == 3
