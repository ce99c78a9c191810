"""benchmarks.hf_decode_compiled's measurement on a tiny decoder: the ops and compiled caches
after the same prompt, the floor beside them, the module switch restored."""

from __future__ import annotations

import statistics

import favor.hf as fh
import favor.ops.local.fused as fused
from benchmarks.hf_decode_compiled import measure
from benchmarks.hf_generate import floor_model


def test_measure_times_ops_compiled_and_floor(tiny_llama):
    softmax = tiny_llama().eval()
    performer = fh.performerize(tiny_llama().eval(), num_features=16, seed=0, exact_window=4, exact_sinks=1)
    rows = measure(performer, floor_model(softmax), [3, 9], tokens=4)
    assert [r["context"] for r in rows] == [3, 9]
    for r in rows:
        assert all(r[f"{n}_token_s"] > 0 for n in ("floor", "ops", "compiled"))
        assert r["compiled_over_floor_of_medians"] == r["compiled_token_s"] / r["floor_token_s"]
        pairs = zip(r["compiled_token_all_s"][2:], r["floor_token_all_s"][2:], strict=True)
        assert r["compiled_over_floor"] == statistics.median(a / b for a, b in pairs)
    assert fused.NATIVE is True
