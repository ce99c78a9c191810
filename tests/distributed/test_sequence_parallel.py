"""sequence_parallel_attention on 2 and 4 gloo processes equals favor.attention(causal=True)
on the whole sequence: outputs and gradients of q, k, v (reference: the single-process
causal path, itself tested against the explicit L x L kernel matrix in tests/attention).

Tolerances: float64 1e-10 (the only difference is the order of the sums combining slices);
float32 1e-5 (the numerics contract's float32 tolerance for paths that agree).
"""

from __future__ import annotations

import pytest
import torch

from favor.distributed import state_bytes

from . import _spawn
from ._sp_workers import sp_case_worker

BASE = {"B": 2, "H": 2, "D": 8, "M": 16, "dtype": torch.float64, "tol": 1e-10}
CASES_2 = [
    {**BASE, "kernel": "positive", "L": 37, "chunk": 5},
    {**BASE, "kernel": "positive", "L": 40, "std": 3.0, "key_shift": 4.0, "chunk": 7},  # log scales far apart
    {**BASE, "kernel": "trig", "L": 33, "chunk": 4, "std": 0.5},  # log scale depends on k: its gradient matters
    {**BASE, "kernel": "hyperbolic", "L": 30},
    {**BASE, "kernel": "oprf", "L": 30, "chunk": 8},
    {**BASE, "kernel": "relu", "L": 29, "chunk": 6},
    {**BASE, "kernel": "elu", "L": 29},
    {**BASE, "kernel": "positive", "L": 36, "mask": True, "pad_span": (18, 36), "chunk": 5},  # rank 1 row 0 all padding
    {**BASE, "kernel": "positive", "L": 24, "bounds": [0, 3, 24]},  # very uneven slices
    {**BASE, "kernel": "positive", "L": 40, "dtype": torch.float32, "tol": 1e-5},
]
CASES_4 = [
    {**BASE, "kernel": "positive", "L": 45, "chunk": 4, "std": 2.0, "key_shift": 3.0},
    {**BASE, "kernel": "trig", "L": 41, "chunk": 3, "std": 0.5},
    {**BASE, "kernel": "positive", "L": 44, "mask": True, "pad_span": (0, 11), "chunk": 4},  # rank 0 row 0 all padding
    {**BASE, "kernel": "oprf", "L": 23, "bounds": [0, 10, 10, 11, 23]},  # rank 1 holds no tokens
    {**BASE, "kernel": "positive", "L": 26, "chunk": 4, "split_groups": True},  # groups {0,1} and {2,3}, own data
]


def _check(cases, results, world):
    assert len(results) == world
    for i, case in enumerate(cases):
        for rank in range(world):
            r = results[rank][i]
            assert r["finite"], (case, rank)
            for name in ("out", "dq", "dk", "dv"):
                assert r[name] <= case["tol"], f"case {i} {case['kernel']} rank {rank}: {name} rel err {r[name]:.2e}"
            # one all-gather of the state forward, one reduce in backward, each of the payload size
            fwd_bytes, fwd_calls, bwd_bytes, bwd_calls = r["counted"]
            assert (fwd_calls, bwd_calls) == (1, 1)
            assert fwd_bytes == bwd_bytes == r["payload"]


def test_two_processes():
    _check(CASES_2, _spawn.run(sp_case_worker, 2, CASES_2), 2)


def test_four_processes():
    _check(CASES_4, _spawn.run(sp_case_worker, 4, CASES_4), 4)


def test_payload_independent_of_length():
    # (B, H) = (1, 8), M = 256 positive features, Dv = 64, float32: the LASP-2 all-gather payload
    assert state_bytes((1, 8), 256, 64) == 8 * (256 * 64 + 256 + 1) * 4 == 532_512
    assert state_bytes((1, 8), 256, 64, torch.float64) == 2 * 532_512


@pytest.mark.parametrize("bad", ["official"])
def test_rejects_sequence_wide_stabilizer(bad):
    import favor
    from favor.distributed import sequence_parallel_attention

    fm = favor.FeatureMap("positive", dim=4, num_features=8, stabilizer=bad)
    x = torch.randn(1, 1, 6, 4)
    with pytest.raises(ValueError, match="stabilizer"):
        sequence_parallel_attention(x, x, x, fm)
