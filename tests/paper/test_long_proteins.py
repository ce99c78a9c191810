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


def test_a_unigram_bias_starts_every_model_at_the_unigram_model():
    res = lp.experiment(quick=True, seconds=0.5, lr=1e-2, warmup=5, output_bias_init="unigram")
    c = res["config"]
    assert (c["lr"], c["warmup"], c["output_bias_init"]) == (1e-2, 5, "unigram")
    assert len(res["runs"]) == 3
    for r in res["runs"]:
        # a logit bias at the log frequencies plus a new model's ~0.1 logits: the unigram's
        # loss within a few hundredths at step 0 (without the bias: ~log 28 = 3.3)
        assert r["curve"][0]["loss"] == pytest.approx(res["unigram"]["loss"], abs=0.05), r["variant"]["name"]
    for init in ("zeros", "none"):  # a zero bias and no bias compute the same logits at step 0
        other = lp.experiment(quick=True, seconds=0.2, output_bias_init=init)
        assert all(r["curve"][0]["loss"] > res["unigram"]["loss"] + 0.1 for r in other["runs"])
        assert other["config"]["output_bias_init"] == init and other["config"]["warmup"] == lp.WARMUP
    with pytest.raises(ValueError, match="output_bias_init must be one of"):
        lp.experiment(quick=True, seconds=0.2, output_bias_init="bigram")
