"""benchmarks.hf_generate's statistics: favor / floor as the median of per-round ratios, and
the measurement on a tiny decoder (ratios restated from the recorded per-token times)."""

from __future__ import annotations

import statistics

import pytest

from benchmarks.hf_generate import _described, _paired, measure


def test_paired_ratio_is_immune_to_a_phase_change_between_two_tokens_of_a_round():
    # seven fast rounds, seven slow; round 8's floor token still ran in the fast phase
    favor = [1.1] * 7 + [2.2] * 7
    floor = [1.0] * 8 + [2.0] * 6
    assert statistics.median(favor) / statistics.median(floor) == pytest.approx(1.65)
    assert _paired(favor, floor) == pytest.approx(1.1)
    with pytest.raises(ValueError):
        _paired([1.0], [1.0, 2.0])


def test_measure_states_each_ratio_from_the_rounds(tiny_llama, monkeypatch):
    import benchmarks.hf_generate as bench
    import favor.hf as fh

    monkeypatch.setitem(bench.MODEL, "vocab_size", 64)  # the tiny model's vocabulary

    softmax = tiny_llama().eval()
    performer = fh.performerize(tiny_llama().eval(), num_features=16, seed=0, exact_window=4, exact_sinks=1)
    rows = measure(softmax, {"favor": performer}, [3, 9], tokens=6)
    warm = 2
    for r in rows:
        favor, floor = r["favor_token_all_s"][warm:], r["floor_token_all_s"][warm:]
        assert len(favor) == len(floor) == 4
        assert r["favor_over_floor"] == statistics.median(a / b for a, b in zip(favor, floor, strict=True))
        assert r["favor_over_floor_of_medians"] == r["favor_token_s"] / r["floor_token_s"]
        sdpa = r["sdpa_token_all_s"][warm:]
        assert r["sdpa_over_favor"] == statistics.median(a / b for a, b in zip(sdpa, favor, strict=True))
        first = rows[0]["favor_token_all_s"][warm:]
        assert r["favor_vs_first"] == statistics.median(a / b for a, b in zip(favor, first, strict=True))
    assert rows[0]["favor_vs_first"] == 1.0
    described = _described(softmax, None)
    assert described["name"] is None and described["num_attention_heads"] == 4
    assert described["num_key_value_heads"] == 2
