"""favor.hf.distill options: which weights train, the learning-rate schedule, bad configs."""

import copy

import pytest
import torch

import favor.hf as fh
from favor.hf.distill import DistillConfig, distill
from tests.hf._batches import unpadded_batches


def _batches():
    return unpadded_batches(2, 2, 10, seed=3)


def test_query_key_training_leaves_other_weights_alone(tiny_bert):
    teacher = tiny_bert()
    student = fh.performerize(copy.deepcopy(teacher), num_features=16, calibration=_batches())
    before = {k: v.clone() for k, v in student.state_dict().items()}
    config = DistillConfig(steps=3, lr=1e-2, train="query-key", schedule="cosine", warmup_steps=2)
    losses = distill(student, teacher, _batches(), config)
    assert len(losses) == 3
    after = student.state_dict()
    changed = {k for k in before if k in after and not torch.equal(before[k], after[k])}
    qk = {k for k in changed if ".attention.self.query." in k or ".attention.self.key." in k}
    favor = {k for k in changed if ".favor." in k}
    assert qk and favor  # the query/key projections and the adapters trained
    assert changed == qk | favor  # nothing else moved (values, outputs, FFNs, embeddings)


def test_adapters_training_moves_only_favors_estimate_and_keeps_exact_terms_exact(tiny_llama):
    # train="adapters": no weight of the model moves, and with every key inside the exact set
    # (window >= length) the student stays the teacher bit for bit in float64 however the
    # adapters trained (the exact logits never pass through the maps)
    teacher = tiny_llama()
    ids = _batches()
    student = fh.performerize(copy.deepcopy(teacher), num_features=16, calibration=ids, exact_window=16)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    distill(student, teacher, ids, DistillConfig(steps=3, adapter_lr=0.1, train="adapters"))
    after = student.state_dict()
    changed = {k for k in before if k in after and not torch.equal(before[k], after[k])}
    assert changed and all(".favor." in k for k in changed)
    with torch.no_grad():
        out, ref = student(**ids[0]).logits, teacher(**ids[0]).logits
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cache_mb", [0.0, 64.0])
def test_teacher_cache_gives_the_same_losses_with_one_teacher_forward_per_batch(tiny_bert, cache_mb):
    teacher = tiny_bert()
    student = fh.performerize(copy.deepcopy(teacher), num_features=16, calibration=_batches())
    reference = copy.deepcopy(student)
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))  # after the copies: the teacher's own calls
    config = DistillConfig(steps=6, lr=1e-2, train="query-key", teacher_cache_mb=0.0)
    expected = distill(reference, teacher, _batches(), config)
    calls.clear()
    cached = DistillConfig(steps=6, lr=1e-2, train="query-key", teacher_cache_mb=cache_mb)
    assert distill(student, teacher, _batches(), cached) == expected  # bit for bit: the same teacher outputs
    assert len(calls) == (6 if cache_mb == 0 else 2)  # 2 batches, each run once when cached


def test_attention_training_moves_the_attention_projections_only(tiny_bert):
    teacher = tiny_bert()
    student = fh.performerize(copy.deepcopy(teacher), num_features=16, calibration=_batches())
    before = {k: v.clone() for k, v in student.state_dict().items()}
    distill(student, teacher, _batches(), DistillConfig(steps=3, lr=1e-2, train="attention"))
    after = student.state_dict()
    changed = {k for k in before if k in after and not torch.equal(before[k], after[k])}
    projections = {
        k
        for k in changed
        if any(f".attention.{n}." in k for n in ("self.query", "self.key", "self.value", "output.dense"))
    }
    favor = {k for k in changed if ".favor." in k}
    assert {k.split(".attention.")[1].rsplit(".", 2)[0] for k in projections} == {
        "self",
        "output",
    }  # both the scores' and the output's side trained
    assert len(projections) == 4 * 2 * len(student.encoder.layer)  # q, k, v, out: weight and bias per layer
    assert changed == projections | favor  # not the LayerNorms, FFNs or embeddings


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"schedule": "linear"}, "schedule must be"),
        ({"train": "values"}, "train must be"),
        ({"embedding_weight": -1.0}, "embedding_weight must be"),
        ({"embedding_weight": float("nan")}, "embedding_weight must be"),
        ({"teacher_cache_mb": -1.0}, "teacher_cache_mb must be"),
    ],
)
def test_distill_config_rejects_unknown_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistillConfig(**kwargs)


def test_logit_kl_is_zero_for_the_teacher_and_counts_real_tokens_only():
    from favor.hf.distill import _logit_kl

    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 5, 7, generator=g)
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert float(_logit_kl(t, t, keep)) == pytest.approx(0.0, abs=1e-7)
    s = t.clone()
    s[0, 3:] += 5.0  # padding only: ignored
    assert float(_logit_kl(s, t, keep)) == pytest.approx(0.0, abs=1e-7)
    s[1, 0, 0] += 5.0
    assert float(_logit_kl(s, t, keep)) > 1e-3


def test_attention_transfer_loss_is_the_mean_relative_error_of_each_call(tiny_bert):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from favor.hf.distill import _student_with_transfer
    from favor.hf.interface import favor_attention_forward
    from favor.hf.registry import observing

    batch = {"input_ids": _batches()[0]["input_ids"], "attention_mask": torch.ones(2, 10, dtype=torch.long)}
    batch["attention_mask"][1, 6:] = 0
    keep = batch["attention_mask"].bool()
    student = fh.performerize(tiny_bert(), kernel="oprf", plain=True, num_features=8, calibration=_batches())
    out, transfer = _student_with_transfer(student, batch)
    assert student.config._attn_implementation == fh.NAME  # restored
    with torch.no_grad():
        torch.testing.assert_close(out.last_hidden_state, student(**batch).last_hidden_state, rtol=0, atol=0)
    # the reference: each layer's FAVOR and softmax outputs on its float64 q, k, v (as the FAVOR
    # model computes them: the observer only records), real tokens only
    calls = []
    with observing(student, lambda module, *args: calls.append((module, *args[:6]))), torch.no_grad():
        student(**batch)
    errs = []
    for module, q, k, v, mask, scaling, is_causal in calls:
        got, _ = favor_attention_forward(module, q, k, v, mask, scaling=scaling, is_causal=is_causal)
        ref, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=scaling, is_causal=is_causal)
        errs.append(((got - ref)[keep] ** 2).sum() / (ref[keep] ** 2).sum())
    assert len(errs) == 2
    # the same float64 numbers summed in a different order
    torch.testing.assert_close(transfer.detach(), torch.stack(errs).mean(), rtol=1e-10, atol=0)
    assert float(transfer.detach()) > 1e-3
    transfer.backward()  # the loss reaches the student's query/key projections
    assert student.encoder.layer[0].attention.self.query.weight.grad is not None


def test_distill_with_attention_transfer_trains(tiny_bert):
    teacher = tiny_bert()
    student = fh.performerize(copy.deepcopy(teacher), num_features=16, calibration=_batches())
    config = DistillConfig(steps=2, lr=1e-2, attention_weight=1.0)
    losses = distill(student, teacher, _batches(), config)
    assert len(losses) == 2 and all(x > 0 for x in losses)
    with pytest.raises(ValueError, match="attention_weight"):
        DistillConfig(attention_weight=-1.0)


@pytest.mark.parametrize("eval_every", [0, -1, 1.5])
def test_distill_rejects_bad_eval_every(tiny_bert, eval_every):
    teacher = tiny_bert()
    student = fh.performerize(copy.deepcopy(teacher), num_features=8, calibration=_batches())
    with pytest.raises(ValueError, match="eval_every must be"):
        distill(student, teacher, _batches(), DistillConfig(steps=1), evaluate=lambda step: None, eval_every=eval_every)


def test_fit_set_takes_batches_in_turn_from_each_length():
    from favor.hf.distill_encoder import fit_set

    short, long = [{"s": i} for i in range(3)], [{"l": i} for i in range(1)]
    assert fit_set([short, long], 2) == [short[0], long[0]]
    assert fit_set([short, long], 4) == [short[0], long[0], short[1], short[2]]  # long ran out: short again
    assert fit_set([short], 2) == short[:2]  # --fit-on short: the old choice, the first short batches
    assert fit_set([short, long], 10) == [short[0], long[0], short[1], short[2]]


def test_gain_lr_moves_the_far_gain_at_its_own_rate_and_nothing_else_changes(tiny_llama):
    # Adam moves a tensor by about its rate per step: with gain_lr 100x adapter_lr the far gain
    # travels ~100x further, while the maps follow the very same trajectory (their group's
    # rate and the clipping norm of their gradients are what they were; the gain's gradient
    # at the first step is the same either way)
    teacher = tiny_llama()
    ids = _batches()
    base = fh.performerize(copy.deepcopy(teacher), num_features=16, calibration=ids, exact_window=4)
    runs = {}
    for gain_lr in (None, 0.1):
        student = copy.deepcopy(base)
        distill(student, teacher, ids, DistillConfig(steps=1, adapter_lr=1e-3, gain_lr=gain_lr, train="adapters"))
        runs[gain_lr] = {k: v for k, v in student.state_dict().items() if ".favor." in k}
    gains = [k for k in runs[None] if k.endswith("far_log_gain")]
    assert gains
    for k in gains:
        slow, fast = runs[None][k].abs().max(), runs[0.1][k].abs().max()
        assert 0 < slow <= 1.01e-3 and fast > 0.05, (k, slow, fast)
    maps = [k for k in runs[None] if k.endswith("query_map")]
    for k in maps:
        torch.testing.assert_close(runs[0.1][k], runs[None][k], rtol=0, atol=0)
    with pytest.raises(ValueError, match="gain_lr"):
        DistillConfig(gain_lr=0.0)


def test_fit_adapters_gain_lr_gives_the_far_gain_its_own_rate(tiny_llama):
    from favor.hf.fit import fit_adapters

    teacher = tiny_llama()
    ids = _batches()
    moved = {}
    for gain_lr in (None, 0.2):
        student = fh.performerize(copy.deepcopy(teacher), num_features=16, calibration=ids, exact_window=4)
        fit_adapters(student, ids, steps=1, lr=1e-3, gain_lr=gain_lr)
        moved[gain_lr] = max(
            float(v.abs().max()) for k, v in student.state_dict().items() if k.endswith("far_log_gain")
        )
    assert moved[None] <= 1.01e-3 and moved[0.2] > 0.1, moved
    with pytest.raises(ValueError, match="gain_lr"):
        fit_adapters(student, ids, steps=1, gain_lr=-1.0)
