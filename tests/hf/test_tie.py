"""favor.hf.tie: the key side of FAVOR's adapters tied per key/value group, in calibration
(performerize's tie_keys pools each group's statistics), attention transfer and fine-tuning
(tie_keys_ after every step), and what it buys: decoding keeps the far state once per
key/value head (LeanConstants.shared) with the teacher-forced logits (float64, 1e-9).
A GQA Llama: 4 query heads, 2 key/value heads (groups of 2)."""

from __future__ import annotations

import copy

import pytest
import torch

import favor.hf as fh
from favor.hf.distill import DistillConfig, distill
from favor.hf.fit import fit_adapters
from favor.hf.tie import key_groups, keys_tied, tie_keys_
from tests.hf._batches import unpadded_batches


def _batches():
    return unpadded_batches(2, 2, 12, seed=3)


def _adapters(model):
    return [(m, m.favor) for m in model.modules() if isinstance(getattr(m, "favor", None), fh.FavorAdapter)]


def _student(teacher, *, tie: bool, window: int = 3):
    return fh.performerize(
        copy.deepcopy(teacher),
        num_features=16,
        calibration=_batches(),
        exact_window=window,
        exact_sinks=1,
        tie_keys=tie,
    )


def _decode(model, ids, prompt: int):
    cache, out = fh.FavorCache(model), []
    with torch.no_grad():
        out.append(model(input_ids=ids[:, :prompt], cache=cache, use_cache=True).logits)
        for t in range(prompt, ids.shape[1]):
            out.append(model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    return torch.cat(out, 1), cache


def test_calibration_ties_the_key_side_per_group_and_only_where_asked(tiny_llama):
    teacher = tiny_llama()
    tied, free = _student(teacher, tie=True), _student(teacher, tie=False)
    for (module, a), (_, b) in zip(_adapters(tied), _adapters(free), strict=True):
        assert key_groups(module) == 2
        assert keys_tied(a, 2) and not keys_tied(b, 2)
        # pooled statistics: one calibration per group (its query maps start equal too)
        assert torch.equal(a.query_map[0], a.query_map[1]) and not torch.equal(b.query_map[0], b.query_map[1])
    assert tied.config.favor_performer["tie_keys"] is True


def test_tie_keys_puts_each_group_on_its_mean(tiny_llama):
    student = _student(tiny_llama(), tie=False)
    before = {id(a): (a.key_map.clone(), a.key_shift.clone()) for _, a in _adapters(student)}
    assert tie_keys_(student) == len(before)
    for _, a in _adapters(student):
        km, ks = before[id(a)]
        assert keys_tied(a, 2)
        torch.testing.assert_close(a.key_map[0], (km[0] + km[1]) / 2, rtol=0, atol=1e-12)
        torch.testing.assert_close(a.key_shift[3], (ks[2] + ks[3]) / 2, rtol=0, atol=1e-12)


@pytest.mark.parametrize("calibrated_tied", [True, False], ids=["pooled", "averaged"])
def test_training_keeps_the_key_side_tied_and_decoding_shares_the_far_state(tiny_llama, calibrated_tied):
    """fit_adapters and distill with tie_keys (from a tied calibration, or from a per-head one
    that tie_keys_ averages first): the key side stays tied while the query maps move apart,
    and the fused decoding step keeps one far state per key/value head with the
    teacher-forced logits."""
    teacher = tiny_llama()
    student = _student(teacher, tie=calibrated_tied)
    fit_adapters(student, _batches(), steps=2, lr=1e-2, tie_keys=True)
    distill(student, teacher, _batches(), DistillConfig(steps=2, adapter_lr=1e-2, train="adapters", tie_keys=True))
    for _, a in _adapters(student):
        assert keys_tied(a, 2)
        assert not torch.equal(a.query_map[0], a.query_map[1])  # the query side per head
        assert not a.key_map.requires_grad  # plain buffers again
    ids = torch.randint(1, 64, (2, 16), generator=torch.Generator().manual_seed(5))
    out, cache = _decode(student, ids, prompt=5)
    assert all(layer.lean is not None and layer.lean.shared for layer in cache.layers)
    with torch.no_grad():
        torch.testing.assert_close(out, student(input_ids=ids).logits, rtol=1e-9, atol=1e-9)


def test_untied_training_keeps_the_far_state_per_query_head(tiny_llama):
    teacher = tiny_llama()
    student = _student(teacher, tie=False)
    distill(student, teacher, _batches(), DistillConfig(steps=1, adapter_lr=1e-2, train="adapters"))
    ids = torch.randint(1, 64, (1, 12), generator=torch.Generator().manual_seed(6))
    out, cache = _decode(student, ids, prompt=5)
    assert all(layer.lean is not None and not layer.lean.shared for layer in cache.layers)
    with torch.no_grad():
        torch.testing.assert_close(out, student(input_ids=ids).logits, rtol=1e-9, atol=1e-9)
