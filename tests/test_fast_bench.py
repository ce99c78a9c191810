"""favor.benchmarking.timing / favor bench: the correctness gate, interleaved timing, fresh-process
memory and the crossover logic, on tiny shapes (seconds)."""

from __future__ import annotations

import torch

from favor.benchmarking.speed import crossover, ratio_table
from favor.benchmarking.timing import (
    BenchConfig,
    check_contender,
    decode_flatness,
    decode_latency,
    peak_memory_mib,
    speed_table,
    time_contenders,
)

TINY = BenchConfig(heads=2, dim=16, num_features=32)


def test_checks_pass_for_favor_and_sdpa():
    for name in ("favor", "favor-causal", "sdpa", "sdpa-causal", "favor-exact", "favor-exact-causal"):
        ok, detail = check_contender(name, TINY, length=64)
        assert ok, detail


def test_check_refuses_a_broken_contender(monkeypatch):
    from favor.benchmarking import timing as bench

    broken = bench.Contender(lambda cfg: lambda q, k, v: torch.zeros_like(v), False, 1.0)
    monkeypatch.setitem(bench.CONTENDERS, "favor", broken)
    ok, detail = check_contender("favor", TINY, length=64)
    assert not ok and "kernel_attention" in detail


def test_time_contenders_interleaved_positive_medians():
    times = time_contenders(["favor", "sdpa"], 64, TINY, backward=True, repeats=2)
    assert set(times) == {"favor", "sdpa"} and all(t > 0 for t in times.values())


def test_peak_memory_grows_with_length():
    """A fresh process per configuration; favor's causal fwd+bwd memory is linear in L, so
    16x the length must need clearly more than the small one but not 16^2 x."""
    small, _ = peak_memory_mib("sdpa", 256, TINY, backward=False)
    big, seconds = peak_memory_mib("favor-causal", 8192, BenchConfig(heads=2, dim=16, num_features=32), backward=True)
    assert seconds > 0 and big >= 0 and small >= 0
    assert big < 200  # linear: q, k, v, grads and O(L/C) states, a few MiB here


def test_speed_table_and_decode_shapes():
    rows = speed_table((64,), quick=True, cfg=TINY, memory=False)
    assert rows[0]["L"] == 64 and rows[0]["fwd_speedup"] > 0
    d = decode_latency(128, TINY, steps=3)
    assert d["favor_step_s"] > 0 and d["sdpa_kv_cache_s"] > 0
    flat = decode_flatness((16, 64), TINY, steps=3, rounds=2)
    assert set(flat) == {16, 64} and min(flat.values()) > 0


def test_crossover_and_table():
    rows = [
        {"contender": c, "mode": "fwd", "L": n, "time_s": t, "mem_mib": 1.0, "matmul_fraction": None, "skipped": None}
        for c, n, t in [
            ("favor", 256, 2.0),
            ("sdpa", 256, 1.0),
            ("favor", 1024, 1.0),
            ("sdpa", 1024, 2.0),
            ("favor", 4096, 1.0),
            ("sdpa", 4096, 9.0),
        ]
    ]
    assert crossover(rows, "favor", "sdpa", "fwd") == 1024
    table = ratio_table(rows)
    assert any(r[2] == "favor" and r[5] == "2.00x" for r in table)


def test_exact_terms_benchmark_prints_its_targets(capsys, monkeypatch, tmp_path):
    from benchmarks import _common, exact_terms

    monkeypatch.setattr(_common, "OUT", tmp_path)
    assert exact_terms.main(["--tiny"]) == 0
    out = capsys.readouterr().out
    assert "check favor-exact-causal: ok" in out
    rows = [line for line in out.splitlines() if line.rstrip().endswith(("PASS", "FAIL"))]
    assert len(rows) >= 6, out  # causal ratio(s), SDPA ratio, bidirectional pair, decode rows
    assert (tmp_path / "exact_terms.json").exists()
