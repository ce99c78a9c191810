"""favor.hf.evaluate on tiny random decoders (float64): perplexity is exp of the mean NLL
computed by hand, a model agrees with itself (KL 0, top-1 1), the passkey prompt hides the
key where asked and the passkey score counts what a model says."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

from favor.hf.evaluate import (
    agreement,
    negative_log_likelihood,
    next_token_logits,
    passkey_accuracy,
    passkey_prompt,
    perplexity,
)
from tests.hf._decoders import FAMILIES, VOCAB, tiny_decoder


def _model(name="llama", seed=0):
    return tiny_decoder(name, seed)


def _ids(p=3, length=20, seed=0):
    return torch.randint(3, VOCAB, (p, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_chunked_logits_are_the_models_logits(name):
    # the output embeddings on the base model's last hidden state are the model's logits
    model, ids = _model(name), _ids(1, 23)
    with torch.no_grad():
        ref = model(input_ids=ids).logits.float()
    for chunk in (None, 1, 7, 23, 100):
        got = torch.cat(list(next_token_logits(model, ids, chunk=chunk)), 1)
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


@pytest.mark.parametrize("chunk", [None, 6, 1024])
def test_perplexity_is_exp_of_the_mean_nll_by_hand(chunk):
    model, ids = _model(), _ids()
    nll = []
    with torch.no_grad():
        for row in ids:
            logp = torch.log_softmax(model(input_ids=row[None]).logits[0].float().double(), -1)
            nll += [-float(logp[t, row[t + 1]]) for t in range(len(row) - 1)]
    total, count = negative_log_likelihood(model, ids, chunk=chunk)
    assert count == 3 * 19 == len(nll)
    assert total == pytest.approx(sum(nll), rel=1e-6)  # float32 logits: round-off only
    assert perplexity(model, ids, chunk=chunk) == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-6)
    # a random model over 61 token ids: near-uniform, so near 61 (not 1, not the vocab's 64 exactly)
    assert 30 < perplexity(model, ids, chunk=chunk) < 150


def test_a_model_agrees_with_itself_and_not_with_another():
    model, ids = _model(), _ids()
    same = agreement(model, model, ids, chunk=5)
    assert same["kl"] == pytest.approx(0.0, abs=1e-9) and same["top1"] == 1.0 and same["positions"] == 60
    other = _model(seed=1)
    got = agreement(model, other, ids)
    with torch.no_grad():
        lt = F.log_softmax(model(input_ids=ids).logits.float(), -1)
        ls = F.log_softmax(other(input_ids=ids).logits.float(), -1)
    ref_kl = float(F.kl_div(ls, lt, log_target=True, reduction="sum")) / 60
    assert got["kl"] == pytest.approx(ref_kl, rel=1e-5) and got["kl"] > 1e-3
    assert got["top1"] == pytest.approx(float((lt.argmax(-1) == ls.argmax(-1)).double().mean()))
    assert got["top1"] < 1.0


def test_bad_ids_are_refused():
    with pytest.raises(ValueError, match=r"ids must be a long tensor \(passages, length >= 2\), got \(5,\)"):
        perplexity(_model(), torch.arange(5))


class Words:
    """A stand-in tokenizer: one token per whitespace-led word or punctuation mark."""

    def __init__(self):
        self.vocab: dict[str, int] = {}
        self.pad_token_id, self.eos_token_id = 0, 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [self.vocab.setdefault(w, len(self.vocab) + 1) for w in re.findall(r" ?\w+|[^\w ]", text)]}

    def decode(self, ids):
        inverse = {i: w for w, i in self.vocab.items()}
        return "".join(inverse.get(i, "") for i in ids)


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_passkey_prompt_hides_the_key_at_the_requested_depth(depth):
    tok = Words()
    p = passkey_prompt(tok, length=1000, depth=depth, key="12345")
    ids = p.ids[0].tolist()
    assert 950 < len(ids) <= 1000
    text = tok.decode(ids)
    assert (
        tok.decode(ids[p.needle_start : p.needle_end]) == " The pass key is 12345. Remember it. 12345 is the pass key."
    )
    assert text.count("12345") == 2 and text.endswith(" What is the pass key? The pass key is")
    filler = tok.decode(ids).split(" The pass key is 12345")[0].count("The grass is green")
    total = text.count("The grass is green")
    assert abs(filler / total - depth) <= 0.5 / total + 1e-12  # the nearest whole filler unit
    with pytest.raises(ValueError, match="key must be 5 digits"):
        passkey_prompt(tok, length=1000, depth=depth, key="1234")
    with pytest.raises(ValueError, match="leaves no room for filler"):
        passkey_prompt(tok, length=60, depth=depth, key="12345")


class Oracle(torch.nn.Module):
    """Generates the key it finds in the prompt (``lie``: a wrong one)."""

    def __init__(self, tok, lie=False):
        super().__init__()
        self.tok, self.lie = tok, lie

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, pad_token_id):
        assert not do_sample and attention_mask.shape == input_ids.shape
        key = re.search(r"pass key is (\d{5})", self.tok.decode(input_ids[0].tolist())).group(1)
        answer = self.tok(f" {int(key) + 1 if self.lie else key}.")["input_ids"][:max_new_tokens]
        return torch.cat([input_ids, torch.tensor([answer])], 1)


def test_passkey_accuracy_counts_the_models_answers_at_evenly_spaced_depths():
    tok = Words()
    right = passkey_accuracy(Oracle(tok), tok, length=300, trials=5, seed=3)
    assert right["accuracy"] == 1.0
    assert [r["depth"] for r in right["trials"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert passkey_accuracy(Oracle(tok, lie=True), tok, length=300, trials=5, seed=3)["accuracy"] == 0.0
    keys = [r["key"] for r in right["trials"]]
    assert keys == [r["key"] for r in passkey_accuracy(Oracle(tok), tok, length=300, trials=5, seed=3)["trials"]]
    assert keys != [r["key"] for r in passkey_accuracy(Oracle(tok), tok, length=300, trials=5, seed=4)["trials"]]
    assert len(set(keys)) == 5 and all(len(k) == 5 for k in keys)


def test_passkey_runs_a_real_generate():
    # plumbing on a tiny random Llama: prompt ids inside its vocabulary, greedy decoding
    class Ids(Words):
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [i % (VOCAB - 3) + 3 for i in super().__call__(text)["input_ids"]]}

    got = passkey_accuracy(_model(), Ids(), length=120, trials=2, new_tokens=3)
    assert got["accuracy"] in (0.0, 0.5, 1.0) and len(got["trials"]) == 2
