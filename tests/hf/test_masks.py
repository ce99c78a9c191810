import pytest
import torch

from favor.hf.masks import keep_from_mask, plan_from_mask


def _causal(b, lq, lk, cols):
    i = torch.arange(lq)[:, None]
    j = torch.arange(lk)[None, :]
    return ((j <= i + lk - lq)[None] & cols[:, None, :])[:, None]


def test_padding_mask_is_read_as_key_padding():
    cols = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    mask = cols[:, None, None, :].expand(2, 1, 5, 5)
    plan = plan_from_mask(mask, batch=2, q_length=5, kv_length=5, is_causal=False)
    assert not plan.causal
    assert torch.equal(plan.key_padding_mask, ~cols)


def test_causal_left_padding_and_cache_offset():
    cols = torch.tensor([[True] * 6, [False] * 2 + [True] * 4])
    plan = plan_from_mask(_causal(2, 6, 6, cols), batch=2, q_length=6, kv_length=6, is_causal=True)
    assert plan.causal and plan.offset == 0
    assert torch.equal(plan.key_padding_mask, ~cols)
    assert torch.equal(plan.dead_queries, torch.tensor([[False] * 6, [True] * 2 + [False] * 4]))
    plan = plan_from_mask(_causal(2, 2, 6, cols), batch=2, q_length=2, kv_length=6, is_causal=True)
    assert plan.causal and plan.offset == 4


def test_additive_float_mask_equals_bool_mask():
    cols = torch.tensor([[True] * 3 + [False]])
    keep = cols[:, None, None, :].expand(1, 1, 4, 4)
    additive = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    assert torch.equal(keep_from_mask(additive), keep)


def test_additive_bias_raises():
    mask = torch.zeros(1, 1, 3, 3)
    mask[..., 0, 1] = -0.5  # a bias, not a block
    with pytest.raises(ValueError, match="additive bias"):
        plan_from_mask(mask, batch=1, q_length=3, kv_length=3, is_causal=False)


def test_arbitrary_pattern_raises():
    keep = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    keep[0, 0, 3, 0] = False  # a sliding window: query 3 loses key 0 only
    with pytest.raises(ValueError, match="cannot express"):
        plan_from_mask(keep, batch=1, q_length=4, kv_length=4, is_causal=True)


def test_no_mask():
    assert not plan_from_mask(None, batch=1, q_length=4, kv_length=4, is_causal=False).causal
    plan = plan_from_mask(None, batch=1, q_length=1, kv_length=7, is_causal=True)
    assert plan.causal and plan.offset == 6
