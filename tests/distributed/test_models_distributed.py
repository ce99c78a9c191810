"""PerformerLM under torch.distributed on 2 gloo CPU processes.

Data parallel (DDP, FSDP): after 4 AdamW steps with feature redraws every 2 steps (seeded by
(seed, layer, step), no communication), parameters and projection matrices are identical
on both ranks and equal single-process training on the same global batch. Sequence
parallel: a PerformerLM whose positions are split across ranks gives the same logits and,
after training, the same parameters as single-process training; so does the training
loop behind `favor train --sequence-parallel` (train_sequence_parallel vs favor.training.train).

Tolerances (float64 models): DDP averages gradients in a different order than one big
batch sums them, so parameters agree to round-off amplified by Adam's 1/sqrt(v); 1e-9 on
weights of order 0.1 leaves orders of magnitude of margin. Across ranks DDP must agree
exactly (0): every rank applies the same reduced gradient.
"""

from __future__ import annotations

import pytest

from . import _spawn
from ._model_workers import all_models_worker

TOL = 1e-9


TRAIN = {"steps": 3, "seq_len": 33, "batch_size": 2, "eval_every": 2, "redraw_interval": 2, "checkpoint_every": 2}


@pytest.fixture(scope="module")
def results():
    return _spawn.run(all_models_worker, 2, TRAIN)


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_data_parallel_matches_single_process(results, kind):
    for rank, res in enumerate(results):
        r = res[kind]
        assert r["keys_match"], rank
        assert r["projection_changed"], "redraws did not happen"
        assert r["projection_spread"] == 0.0, (rank, r)
        assert r["projection_vs_single"] == 0.0, (rank, r)
        assert r["rank_spread"] == 0.0, (kind, rank, r)
        assert r["vs_single"] <= TOL, (kind, rank, r)


@pytest.mark.parametrize("position", ["rotary", "learned"])
def test_sequence_parallel_lm_matches_single_process(results, position):
    for rank, res in enumerate(results):
        r = res[f"sp_{position}"]
        assert r["logits"] <= 1e-12, (rank, r)
        assert r["rank_spread"] == 0.0, (rank, r)
        assert r["vs_single"] <= TOL, (position, rank, r)


def test_sequence_parallel_training_matches_single_process(results):
    # favor.distributed.train_sequence_parallel vs favor.training.train: same batches (seeded by
    # step), schedule, clipping and redraws; seq_len 33 splits unevenly (17 + 16)
    r0, r1 = results[0]["train"], results[1]["train"]
    assert r0["vs_single"] <= TOL, r0["vs_single"]
    assert abs(r0["loss"] - r0["single_loss"]) <= TOL
    assert r0["loss"] == r1["loss"]  # the global loss is all-reduced
    assert [r["step"] for r in r0["rows"]] == [1, 2, 3]
    assert r0["checkpoint"] == ["LATEST", "step_00000002", "step_00000003"]
    assert r0["log_lines"] == 3
