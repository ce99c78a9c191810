"""long-proteins' pieces: the family stream it trains on and the copy baseline it reports."""

from __future__ import annotations

import pytest
import torch

from favor.data import load_proteins
from favor.paper import long_proteins as lp
from favor.paper.tasks import CausalLM, StreamSource


def copy_task(stream: torch.Tensor, length: int) -> CausalLM:
    return CausalLM(
        StreamSource(stream, length + 1), StreamSource(stream, length + 1), vocab_size=28, batch_size=1, eval_rows=2
    )


def test_copy_baseline_copies_repeats_and_finds_none_in_noise():
    g = torch.Generator().manual_seed(0)
    unit = torch.randint(3, 28, (40,), generator=g)
    repeated = copy_task(unit.repeat(20), 200)
    got = lp.copy_baseline(repeated)
    # a row of 200 tokens of a 40-periodic stream: every target after the first period and
    # the first k inputs is a repeat, and the repeat is right (the period has no inner repeat
    # of 5 tokens at odds ~ 40^2 / 25^5)
    assert got["copied"] >= (200 - 40 - lp.COPY_K) / 200
    assert got["accuracy"] >= got["copied"]
    noise = copy_task(torch.randint(3, 28, (5000,), generator=g), 200)
    assert lp.copy_baseline(noise)["copied"] < 0.01  # 5-grams of 25 symbols: ~200 / 25^5 per target


def test_copy_baseline_counts_only_scored_targets():
    task = copy_task(torch.arange(3, 28).repeat(8), 60)
    for b in task.eval_set:
        b.weight[:, :30] = False
    got = lp.copy_baseline(task)
    assert got["accuracy"] == pytest.approx(1.0)  # every scored target follows a 25-periodic repeat


def test_family_split_holds_relatives_and_keeps_them_apart():
    records = load_proteins()[: lp.QUICK_PROTEINS]
    train, val = lp.protein_split(records, "families", quick=True)
    assert len(val) >= 2 and len(train) > 10 * len(val)
    assert not {n for n, _ in train} & {n for n, _ in val}
    assert len(train) + len(val) < len(records) // 2  # only proteins with a relative
    everything = lp.protein_split(records, "all", quick=True)
    assert sum(map(len, everything)) == len(records)
    with pytest.raises(ValueError, match="proteins must be one of"):
        lp.protein_split(records, "some", quick=True)
