"""The paper experiments' shared pieces: tasks, models per variant, the training loop's
bookkeeping, comparisons at equal steps and equal time, data readers and family splits."""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import replace

import numpy as np
import pytest
import torch

from favor.data.austen import AUSTEN_DATA, AUSTEN_NOVELS, _r_strings, read_austen
from favor.nn import feature_maps
from favor.paper.books import length_schedule
from favor.paper.corpora import load_mnist
from favor.paper.families import family_split, homology_clusters
from favor.paper.harness import ModelSize, Variant, at_time, build_model, compare, train_run
from favor.paper.peers import bucket_size
from favor.paper.tasks import CausalLM, MaskedLM, SequenceSource, StreamSource
from favor.paper.transfer import steps_within, swap_to_favor

TINY = ModelSize(dim=16, depth=1, heads=2, max_len=64)


def _stream(n=5000, vocab=20, seed=0):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def test_masked_lm_masks_about_15_percent_and_scores_only_masked_tokens():
    src = StreamSource(_stream(), 64)
    task = MaskedLM(src, src, mask_id=20, vocab_size=21, batch_size=32, eval_rows=2)
    b = task.batch(3, 0)
    assert torch.equal(b.inputs == 20, b.weight)
    assert torch.equal(b.inputs[~b.weight], b.targets[~b.weight])
    # 2,048 tokens at rate 0.15: mean 307, sd 16; 0.12..0.18 is beyond 3.5 sd either side
    assert 0.12 < b.weight.float().mean().item() < 0.18
    again, other = task.batch(3, 0), task.batch(3, 1)
    assert torch.equal(again.inputs, b.inputs) and not torch.equal(other.inputs, b.inputs)


def test_length_warmup_doubles_in_equal_stages_then_holds_the_full_length():
    lengths = [length_schedule(s, steps=16, start=128, full=2048, fraction=0.5) for s in range(1, 17)]
    assert lengths == [128, 128, 256, 256, 512, 512, 1024, 1024] + [2048] * 8
    assert {length_schedule(s, steps=10, start=128, full=2048, fraction=0.0) for s in range(1, 11)} == {2048}
    assert length_schedule(1, steps=10, start=4096, full=2048, fraction=0.5) == 2048
    with pytest.raises(ValueError, match="fraction"):
        length_schedule(1, steps=10, start=128, full=2048, fraction=1.5)


def test_context_plan_is_books_and_transfers_one_length_setup():
    """books and transfer share context_plan: at the mode's context nothing changes; at another
    the positions follow it and the evaluated rows keep the evaluated tokens."""
    from favor.paper.books import CURRICULUM, MODES, context_plan

    size, n_len, _, _, _, rows = MODES["quick"][:6]
    same = context_plan("quick", size, seq_len=n_len, eval_rows=rows, steps=20, length_warmup=0.0)
    assert same == (size, rows, None, (CURRICULUM["quick"][0], 0.0))
    got, got_rows, lengths, (start, fraction) = context_plan(
        "quick", size, seq_len=4 * n_len, eval_rows=rows, steps=20, length_warmup=None
    )
    assert got.max_len == 4 * n_len and got_rows == max(1, rows // 4) and fraction == CURRICULUM["quick"][1]
    want = [length_schedule(s, steps=20, start=start, full=4 * n_len, fraction=fraction) for s in range(1, 21)]
    assert [lengths(s) for s in range(1, 21)] == want and want[0] == start < want[-1]


def test_a_length_curriculum_keeps_the_tokens_per_step_and_evaluates_at_full_length():
    src = StreamSource(torch.arange(5000) % 20, 64)  # a window's tokens count up mod 20
    task = MaskedLM(
        src, src, mask_id=20, vocab_size=21, batch_size=2, eval_rows=3, length_at=lambda s: 64 // 2 ** (s % 3)
    )
    for step, shape in ((0, (2, 64)), (1, (4, 32)), (2, (8, 16))):
        b = task.batch(step, 0)
        assert b.inputs.shape == b.targets.shape == b.weight.shape == shape
        assert ((b.targets[:, 1:] - b.targets[:, :-1]) % 20 == 1).all()  # contiguous windows
        assert b.weight.any() and torch.equal(b.inputs[~b.weight], b.targets[~b.weight])
    assert [e.inputs.shape for e in task.eval_set] == [(3, 64)]
    bad = MaskedLM(src, src, mask_id=20, vocab_size=21, batch_size=2, eval_rows=1, length_at=lambda s: 65)
    with pytest.raises(ValueError, match="length_at"):
        bad.batch(1, 0)
    seqs = SequenceSource([torch.arange(5)], 8, pad_id=0)
    with pytest.raises(TypeError, match="length_at"):
        MaskedLM(seqs, seqs, mask_id=20, vocab_size=21, batch_size=2, eval_rows=1, length_at=lambda s: 4)


def test_masked_lm_never_masks_padding():
    seqs = [torch.arange(3, 3 + n) for n in (5, 40, 12)]
    src = SequenceSource(seqs, 32, pad_id=0)
    task = MaskedLM(src, src, mask_id=50, vocab_size=51, batch_size=16, eval_rows=2)
    b = task.batch(1, 0)
    assert b.padding is not None
    assert not (b.weight & b.padding).any()
    assert (b.inputs[b.padding] == 0).all()


def test_causal_lm_targets_are_next_tokens_and_padding_is_not_scored():
    seqs = [torch.arange(1, 1 + n) for n in (4, 9)]
    task = CausalLM(SequenceSource(seqs, 16, 0), SequenceSource(seqs, 16, 0), vocab_size=12, batch_size=8, eval_rows=2)
    b = task.batch(0, 0)
    assert torch.equal(b.inputs[:, 1:], b.targets[:, :-1])
    assert (b.targets[b.weight] != 0).all() and (b.targets[~b.weight] == 0).all()


def test_unigram_baseline_is_the_entropy_of_a_uniform_stream():
    src = StreamSource(torch.arange(8).repeat(2000), 32)
    task = CausalLM(src, src, vocab_size=8, batch_size=2, eval_rows=4)
    # add-one counts of 16,000 tokens: frequencies 1/8 to 1e-4, so 3 bits to 1e-3
    assert task.unigram()["bits"] == pytest.approx(3.0, abs=1e-3)


def test_bigram_baseline_predicts_a_cyclic_stream_and_is_the_unigram_on_iid_tokens():
    src = StreamSource(torch.arange(8).repeat(2000), 32)
    task = CausalLM(src, src, vocab_size=8, batch_size=2, eval_rows=4)
    # 0 1 2 ... 7 0 1 ...: each token fixes the next; add-one counts of ~2,000 pairs per row
    # leave p(next) = 2001/2008, so loss ~0.0035 nats and every target right
    got = task.bigram()
    assert got["accuracy"] == 1.0 and got["loss"] == pytest.approx(-math.log(2000 / 2007), abs=1e-3)
    iid = StreamSource(torch.randint(0, 4, (40_000,), generator=torch.Generator().manual_seed(0)), 64)
    task = CausalLM(iid, iid, vocab_size=4, batch_size=2, eval_rows=8)
    # independent tokens: the next token's counts given any token are the frequencies
    # (16 pair counts of ~2,500 each: relative error ~2 %, in the loss ~1e-3 nats)
    assert task.bigram()["loss"] == pytest.approx(task.unigram()["loss"], abs=3e-3)


def test_variants_of_a_seed_start_from_the_same_weights_and_smreg_rows_have_norm_sqrt_d():
    soft = build_model(Variant("s", attention="softmax"), TINY, vocab_size=11, causal=False, seed=4)
    smreg = build_model(Variant("m", norm="sqrt_d"), TINY, vocab_size=11, causal=False, seed=4)
    sd = smreg.state_dict()
    for k, v in soft.state_dict().items():
        assert torch.equal(v, sd[k]), k
    w = feature_maps(smreg)[0].projection
    assert torch.allclose(w.norm(dim=-1), torch.full((w.shape[0],), math.sqrt(w.shape[1])), atol=1e-5)
    plain = feature_maps(build_model(Variant("p"), TINY, vocab_size=11, causal=False, seed=4))[0].projection
    assert not torch.allclose(plain.norm(dim=-1), w.norm(dim=-1))


def test_train_run_learns_a_repeating_stream_and_records_its_curve():
    src = StreamSource(torch.arange(10).repeat(300), 32)
    task = CausalLM(src, src, vocab_size=10, batch_size=4, eval_rows=2)
    ticks = []
    r = train_run(task, Variant("f"), TINY, seed=0, steps=30, eval_every=10, lr=1e-2, warmup=1, progress=ticks.append)
    assert [p["step"] for p in r["curve"]] == [0, 10, 20, 30]
    assert sum(ticks) == 30 and r["diverged_at"] is None
    # 0 1 2 ... 9 repeated: the next token is determined; chance is 10 %
    assert r["curve"][-1]["accuracy"] > 0.9 > r["curve"][0]["accuracy"] + 0.5


def test_a_logit_bias_started_at_the_token_frequencies_scores_the_unigram_baseline_at_step_0():
    # a skewed stream: token 0 is half of it, so the unigram model is far from uniform
    stream = torch.cat([torch.zeros(3000, dtype=torch.long), _stream(3000, vocab=10)])
    stream = stream[torch.randperm(6000, generator=torch.Generator().manual_seed(1))]
    src = StreamSource(stream, 32)
    task = CausalLM(src, src, vocab_size=10, batch_size=2, eval_rows=4)
    log_p = task.log_frequencies()
    assert float(log_p.exp().sum()) == pytest.approx(1.0)
    size = replace(TINY, output_bias=True)
    r = train_run(task, Variant("s", attention="softmax"), size, seed=0, steps=0, eval_every=1, logit_bias=log_p)
    assert torch.allclose(r["model"].logit_bias, log_p.float())
    # the other logits of a new model are ~N(0, 0.02) x 4 (N(0, 0.02) head weights over a
    # layer-normed 16-dim hidden state), ~0.1: the loss is the unigram's within ~0.01
    assert r["curve"][0]["loss"] == pytest.approx(task.unigram()["loss"], abs=0.03)
    plain = train_run(task, Variant("s", attention="softmax"), TINY, seed=0, steps=0, eval_every=1)
    assert plain["curve"][0]["loss"] > r["curve"][0]["loss"] + 0.2  # about log 10 = 2.30 against ~1.9
    # the bias trains without weight decay (a parameter of one dimension), like the others' biases
    moved = train_run(task, Variant("s", attention="softmax"), size, seed=0, steps=3, eval_every=3, logit_bias=log_p)
    assert not torch.equal(moved["model"].logit_bias, r["model"].logit_bias)
    with pytest.raises(ValueError, match="ModelSize.output_bias"):
        train_run(task, Variant("s", attention="softmax"), TINY, seed=0, steps=0, eval_every=1, logit_bias=log_p)
    with pytest.raises(ValueError, match="a given model keeps its own"):
        train_run(task, Variant("s"), size, seed=0, steps=0, eval_every=1, model=r["model"], logit_bias=log_p)


class _NaNTask:
    causal, vocab_size = True, 10

    def __init__(self, inner, at):
        self.inner, self.at = inner, at

    def batch(self, step, seed):
        return step

    def loss(self, model, step):
        loss = self.inner.loss(model, self.inner.batch(step, 0))
        return loss * float("nan") if step >= self.at else loss

    def evaluate(self, model):
        return self.inner.evaluate(model)


def test_a_non_finite_loss_stops_the_run_and_the_bar_still_completes():
    src = StreamSource(torch.arange(10).repeat(100), 16)
    task = _NaNTask(CausalLM(src, src, vocab_size=10, batch_size=2, eval_rows=1), at=4)
    ticks = []
    r = train_run(task, Variant("t", kernel="trig"), TINY, seed=0, steps=10, eval_every=2, progress=ticks.append)
    assert r["diverged_at"] == 4 and r["curve"][-1]["step"] == 2 and sum(ticks) == 10


def _run(name, seed, points, diverged=None):
    curve = [{"step": s, "time": t, "accuracy": a, "loss": 1 - a} for s, t, a in points]
    return {"variant": {"name": name}, "seed": seed, "curve": curve, "diverged_at": diverged, "sec_per_step": 1.0}


def test_compare_reads_equal_steps_and_the_largest_common_time():
    fast = _run("fast", 0, [(0, 0.0, 0.0), (10, 1.0, 0.3), (20, 2.0, 0.4)])
    slow = _run("slow", 0, [(0, 0.0, 0.0), (10, 3.0, 0.5), (20, 6.0, 0.6)])
    bad = _run("bad", 0, [(0, 0.0, 0.0)], diverged=3)
    c = compare([fast, slow, bad])
    assert (c["step"], c["time"]) == (20, 2.0)
    assert c["variants"]["fast"]["accuracy@step"] == 0.4 and c["variants"]["slow"]["accuracy@step"] == 0.6
    assert c["variants"]["fast"]["accuracy@time"] == 0.4 and c["variants"]["slow"]["accuracy@time"] == 0.0
    assert c["variants"]["bad"]["diverged"] == [0] and "accuracy@step" not in c["variants"]["bad"]
    assert at_time(slow["curve"], 3.5)["step"] == 10
    assert steps_within(slow["curve"], 0.55) == 20 and steps_within(slow["curve"], 0.9) is None


def test_the_hybrid_variant_is_favor_with_exact_window_and_sinks_from_the_same_weights():
    from favor import ExactTerms
    from favor.paper.harness import hybrid

    v = hybrid(window=8, sinks=2)
    assert v.name == "hybrid FAVOR+ (W=8 S=2)" and v.kernel == "positive"
    soft = build_model(Variant("s", attention="softmax"), TINY, vocab_size=11, causal=True, seed=4)
    mixed = build_model(v, TINY, vocab_size=11, causal=True, seed=4)
    assert mixed.config.exact == ExactTerms(8, sinks=2) and mixed.blocks[0].attn.exact == ExactTerms(8, sinks=2)
    sd = mixed.state_dict()
    assert all(torch.equal(w, sd[k]) for k, w in soft.state_dict().items())
    assert build_model(Variant("p"), TINY, vocab_size=11, causal=True, seed=4).config.exact is None


def test_a_hybrid_with_a_far_gain_starts_from_the_same_weights_and_its_curve_records_the_gain():
    from favor.paper.harness import hybrid

    v = hybrid("g", window=4, sinks=1, far_gain=-1.0)
    assert v.name == "g (W=4 S=1)" and v.far_gain == -1.0
    plain = build_model(hybrid(window=4, sinks=1), TINY, vocab_size=10, causal=True, seed=4).state_dict()
    gained = build_model(v, TINY, vocab_size=10, causal=True, seed=4).state_dict()
    assert gained.pop("blocks.0.attn.far_log_gain").tolist() == [-1.0, -1.0]
    assert list(gained) == list(plain)
    for k, w in gained.items():  # bit-equal; rho is NaN (unused by positive features)
        torch.testing.assert_close(w, plain[k], rtol=0, atol=0, equal_nan=True)
    src = StreamSource(torch.arange(10).repeat(300), 32)
    task = CausalLM(src, src, vocab_size=10, batch_size=2, eval_rows=1)
    r = train_run(task, v, TINY, seed=0, steps=4, eval_every=2, lr=1e-2, warmup=1)
    gains = [p["far_log_gain"] for p in r["curve"]]
    assert gains[0] == [[-1.0, -1.0]] and gains[-1] != gains[0]  # one layer of two heads, trained
    plain_run = train_run(task, Variant("f"), TINY, seed=0, steps=2, eval_every=2)
    assert all("far_log_gain" not in p for p in plain_run["curve"])


def test_swap_to_favor_keeps_every_softmax_weight():
    soft = build_model(Variant("s", attention="softmax"), TINY, vocab_size=11, causal=False, seed=1)
    with torch.no_grad():
        for p in soft.parameters():
            p.add_(0.1)
    fav = swap_to_favor(soft, TINY, vocab_size=11, seed=1)
    sd = fav.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in soft.state_dict().items())
    assert feature_maps(fav) and fav.blocks[0].attn.attention == "favor"


def test_transfer_grows_the_context_for_pretraining_and_scratch_and_finetunes_at_full_length(monkeypatch):
    from favor.paper import transfer

    seen = {}

    def fake_train_run(task, variant, size, *, seed, steps, model=None, **kw):
        seen[variant.name] = [task.batch(s, seed).inputs.shape[1] for s in range(1, steps + 1)]
        if model is None:
            model = build_model(variant, size, vocab_size=task.vocab_size, causal=False, seed=seed)
        return {"curve": [{"step": s, "accuracy": 0.1} for s in range(0, steps + 1, 2)], "model": model}

    monkeypatch.setattr(transfer, "train_run", fake_train_run)
    res = transfer.experiment(quick=True, steps=8, finetune=4)
    # quick mode is books' quick setting: L = 256, grown from 128 over the first half of the
    # 8 pre-training steps; the scratch run follows the same schedule, then stays at 256
    assert seen[transfer.SOFTMAX.name] == [128] * 4 + [256] * 4
    assert seen[transfer.SWAPPED.name] == [256] * 4
    assert seen[transfer.HYBRID.name] == [256] * 4
    assert seen[transfer.SCRATCH.name] == [128] * 4 + [256] * 8
    assert res["config"]["length_warmup"]["of_steps"] == 8 and res["config"]["seq_len"] == 256


def _xdr_strings(lines: list[str]) -> bytes:
    out = b"X\n" + struct.pack(">iii", 3, 0x040201, 0x030500) + struct.pack(">i", 5) + b"UTF-8"
    out += struct.pack(">ii", 16, len(lines))
    for s in lines:
        raw = s.encode()
        out += struct.pack(">ii", 0x00040009, len(raw)) + raw
    return out


def test_r_reader_reads_character_vectors_and_austen_novels_by_title(tmp_path):
    assert _r_strings(_xdr_strings(["EMMA", "", "Chapter 1"])) == ["EMMA", "", "Chapter 1"]
    titles = [
        "SENSE AND SENSIBILITY",
        "Pride and Prejudice",
        "MANSFIELD PARK",
        "EMMA",
        "NORTHANGER ABBEY",
        "PERSUASION",
    ]
    blob = b""
    for t in titles:
        body = _xdr_strings(["", t, "text of " + t])
        blob += struct.pack(">I", len(body)) + zlib.compress(body)
    (tmp_path / "Rdata.rdb").write_bytes(blob)
    novels = read_austen(tmp_path / "Rdata.rdb")
    assert novels["prideprejudice"] == "\nPride and Prejudice\ntext of Pride and Prejudice\n"
    (tmp_path / "bad.rdb").write_bytes(struct.pack(">I", 10) + zlib.compress(_xdr_strings(["ULYSSES"])))
    with pytest.raises(ValueError, match="ULYSSES"):
        read_austen(tmp_path / "bad.rdb")


def test_austen_reader_agrees_with_the_rdata_package_on_the_real_novels():
    # the built-in reader against PyPI rdata, which follows the package's own index (.rdx)
    # instead of walking the blocks and recognising titles; runs where an earlier
    # `favor paper books` (or fetch_austen) has downloaded the package (CI does not need it)
    import gzip
    import warnings
    from pathlib import Path

    rdata = pytest.importorskip("rdata")
    data = Path.home() / ".cache" / "favor" / "paper" / "janeaustenr" / AUSTEN_DATA
    if not data.is_file():
        pytest.skip("Jane Austen's package is not downloaded (favor.data.austen.fetch_austen)")
    index_blob = gzip.decompress(data.with_suffix(".rdx").read_bytes())
    raw = data.read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata: "Unknown file type: assumed RDS"
        index = rdata.conversion.convert(rdata.parser.parse_data(index_blob))["variables"]
        theirs = {
            str(name): rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(raw[o + 4 : o + n])))
            for name, (o, n) in index.items()
        }
    ours = read_austen(data)
    assert set(ours) == set(theirs) == set(AUSTEN_NOVELS.values())
    for name, lines in theirs.items():
        assert ours[name] == "\n".join("" if x is None else str(x) for x in lines) + "\n", name


def test_books_full_mode_uses_austen_and_falls_back_to_the_bible_with_a_note(monkeypatch, tmp_path):
    import favor.paper.books as books
    from favor.paper.books import corpus

    fake = {name: f"{name} text\n" for name in AUSTEN_NOVELS.values()}
    monkeypatch.setattr(books, "fetch_austen", lambda cache: dict(fake))
    train, val, note = corpus(quick=False, data_dir=tmp_path)
    assert "austen: persuasion" in val and "austen: persuasion" not in train
    assert sum(k.startswith("austen: ") for k in train) == 5 and "Jane Austen" in note

    def missing(cache):
        raise RuntimeError("apt-get not found")

    monkeypatch.setattr(books, "fetch_austen", missing)
    train, val, note = corpus(quick=False, data_dir=tmp_path)
    assert not any(k.startswith("austen") for k in (*train, *val))
    assert "Jane Austen unavailable: apt-get not found" in note
    assert corpus(quick=True, data_dir=tmp_path)[2] == "King James Bible only"


def test_shipped_mnist_extract_has_50_images_per_digit():
    x, y = load_mnist()
    assert x.shape == (500, 784) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [50] * 10


def test_homology_clusters_link_shared_words_but_not_low_complexity_runs():
    rng = np.random.default_rng(0)
    aa = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
    r = lambda n: "".join(rng.choice(aa, n))  # noqa: E731
    core = r(30)
    seqs = [r(50) + core + r(20), r(40) + core[5:25] + r(10), r(80), r(30) + "Q" * 30, r(25) + "Q" * 30 + r(5)]
    ids = homology_clusters(seqs)
    assert ids[0] == ids[1]
    assert len({ids[0], ids[2], ids[3]}) == 3 and ids[3] != ids[4]


def test_family_split_holds_out_whole_clusters():
    rng = np.random.default_rng(1)
    aa = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
    seqs = []
    for _ in range(30):  # 30 families of 4 members sharing a 15-residue word
        word = "".join(rng.choice(aa, 15))
        seqs += ["".join(rng.choice(aa, 20)) + word + "".join(rng.choice(aa, 20)) for _ in range(4)]
    train, test, ood, info = family_split(seqs, ood_families=5, min_family=2, test_fraction=0.1, max_fraction=0.1)
    assert len(ood) == 20 and info["ood_family_sizes"] == [4] * 5
    ids = homology_clusters(seqs)
    assert not set(ids[ood]) & set(ids[train]) and not set(ood) & set(test)
    assert len(train) + len(test) + len(ood) == len(seqs)


def test_reformer_bucket_divides_the_length():
    assert bucket_size(2048) == 64 and bucket_size(784) == 56 and bucket_size(196) == 49
    with pytest.raises(ValueError, match="even"):
        bucket_size(785)


def test_a_missing_peer_library_is_skipped_with_the_reason(monkeypatch):
    from favor.paper import harness
    from favor.paper.suite import run_suite

    monkeypatch.setitem(harness.PEERS, "linformer", "no_such_module_for_favor_tests")
    src = StreamSource(_stream(600), 16)
    task = MaskedLM(src, src, mask_id=20, vocab_size=21, batch_size=2, eval_rows=1)
    runs, skipped = run_suite(
        task, [Variant("L", attention="linformer"), Variant("f")], TINY, seeds=[0], steps=1, eval_every=1
    )
    assert [r["variant"]["name"] for r in runs] == ["f"]
    assert "no_such_module_for_favor_tests is not installed" in skipped["L"]


@pytest.mark.slow
@pytest.mark.skipif(
    __import__("importlib").util.find_spec("antiberty") is None, reason="pip install --no-deps antiberty==0.1.3"
)
def test_antiberty_swap_loses_accuracy_and_one_fine_tuning_step_starts_to_recover():
    from favor.paper.antiberty_transfer import antiberty_transfer

    torch.set_num_threads(1)
    r = antiberty_transfer(steps=1, eval_every=1)
    c = r["curve"]
    # measured: softmax 0.841, plain FAVOR+ at M=256 0.347, 0.403 after one step (860 masked)
    assert r["softmax_accuracy"] > 0.8 and c[0]["accuracy"] < 0.6 < r["softmax_accuracy"]
    assert c[1]["accuracy"] > c[0]["accuracy"]


@pytest.mark.parametrize("kernel", ["positive", "relu"])
def test_masked_lm_gradients_of_the_favor_model_equal_the_explicit_reference(kernel):
    # the books diagnosis rests on this: FAVOR's plateau is not a wrong gradient. One float64
    # masked-LM step through the fast bidirectional path and through the explicit L x L
    # kernelised reference with the same features: the same sums in another order, so the
    # gradients agree to round-off (1e-10 relative leaves 1e5 x float64 epsilon of headroom)
    from favor.paper.grad_check import reference_grad_error

    src = StreamSource(_stream(vocab=20), 48)
    task = MaskedLM(src, src, mask_id=20, vocab_size=21, batch_size=4, eval_rows=1)
    model = build_model(Variant("f", kernel=kernel), TINY, vocab_size=21, causal=False, seed=0).double()
    assert reference_grad_error(model, task, task.batch(1, 0)) < 1e-10


def test_the_gradient_check_sees_a_wrong_fast_path_and_restores_it(monkeypatch):
    # a fast path off by 10 % in its output must show up, and the real one must be put back
    from favor.nn import attention as A
    from favor.paper.grad_check import reference_grad_error

    src = StreamSource(_stream(vocab=20), 48)
    task = MaskedLM(src, src, mask_id=20, vocab_size=21, batch_size=4, eval_rows=1)
    model = build_model(Variant("f", kernel="positive"), TINY, vocab_size=21, causal=False, seed=0).double()
    real = A.ATTENTIONS["favor"]

    def wrong(*args):
        out, state = real(*args)
        return out * 1.1, state

    monkeypatch.setitem(A.ATTENTIONS, "favor", wrong)
    assert reference_grad_error(model, task, task.batch(1, 0)) > 1e-3
    assert A.ATTENTIONS["favor"] is wrong
