import json

from favor.benchmarking.approximation import approximation_table
from favor.cli import main
from favor.training.demo import _plot_approximation, _plot_speed


def test_approximation_table_falls_with_m_and_carries_the_baseline(tmp_path):
    rows = approximation_table(
        kernels=("positive", "elu"), num_features=(16, 1024), logit_stds=(0.1,), length=64, dim=8
    )
    pos = [r for r in rows if r["kernel"] == "positive"]
    assert [r["num_features"] for r in pos] == [16, 1024]
    # 64x more features: the Monte Carlo error shrinks by ~8x; 2x is a loose, safe bound
    assert pos[1]["rel_error"] < pos[0]["rel_error"] / 2
    assert all(r["finite"] and r["uniform_baseline"] > 0 for r in rows)
    assert [r["num_features"] for r in rows if r["kernel"] == "elu"] == [None]
    _plot_approximation(rows, tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"


def test_speed_plot(tmp_path):
    rows = [
        {"L": n, "favor_fwd_ms": n / 100, "sdpa_fwd_ms": n * n / 1e5, "favor_fwd_mib": 1.0, "sdpa_fwd_mib": None}
        for n in (1024, 4096)
    ]
    _plot_speed(rows, tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_demo_cli_approximation_only(tmp_path, monkeypatch, capsys):
    import favor.benchmarking.approximation as approx

    small = approx.approximation_table
    monkeypatch.setattr(
        approx, "approximation_table", lambda: small(kernels=("positive",), num_features=(8,), length=16, dim=4)
    )
    assert main(["demo", "--out", str(tmp_path), "--skip-speed", "--lm-seconds", "0"]) == 0
    report = json.loads((tmp_path / "demo.json").read_text())
    assert len(report["approximation"]) == 2 and "rel. error" in capsys.readouterr().out
    assert (tmp_path / "approximation.png").exists()


def test_demo_cli_prints_tables_not_dicts(tmp_path, monkeypatch, capsys):
    """Every part is a table with a header rule and a one-line caption; no raw dicts."""
    import favor.benchmarking.approximation as approx
    import favor.training.demo as lm

    small = approx.approximation_table
    monkeypatch.setattr(
        approx, "approximation_table", lambda: small(kernels=("positive", "trig"), num_features=(8,), length=16, dim=4)
    )
    monkeypatch.setattr(lm, "CONTEXTS", (64, 128))
    monkeypatch.setattr(lm, "probe_train_step", lambda cfg, context: (1.0, 0.05))  # no fresh processes here
    argv = ["demo", "--out", str(tmp_path), "--skip-speed", "--lm-seconds", "1", "--lm-context", "32"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for part in ("(a) approximation", "(c) English byte language model at context 32", "(d) decoding"):
        assert part in out
    assert out.count("  -> ") == 3  # one caption per table
    assert "{" not in out and "}" not in out
    report = json.loads((tmp_path / "demo.json").read_text())
    runs = report["language_model"]["runs"]
    assert set(runs) == {"hybrid", "softmax"} and all(r["steps"] >= 4 for r in runs.values())
    # the state the hybrid keeps (FAVOR's and a ring) does not grow with the context;
    # softmax's cache does, linearly
    kib = report["language_model"]["decode_state_kib"]
    assert kib["softmax"]["128"] == 2 * kib["softmax"]["64"] and kib["hybrid"] < kib["softmax"]["128"]


def test_probe_train_step_runs_in_a_fresh_process():
    from favor.models import PerformerConfig
    from favor.training.demo import probe_train_step

    peak, seconds = probe_train_step(PerformerConfig(vocab_size=28, dim=16, depth=1, heads=2), 256)
    assert peak >= 0 and 0 < seconds < 30


def test_lm_demo_trains_both_models_alike_from_the_byte_frequencies(tmp_path, monkeypatch):
    """Both LMs get the demo's schedule and a logit bias that starts at the training bytes'
    log frequencies: their first loss sits at about the byte-frequency baseline (a bias-free
    model starts at log2(256) = 8 bits)."""
    import favor.training.demo as lm
    from favor.training.loop import LN2, load_lm, read_log

    monkeypatch.setattr(lm, "CONTEXTS", (64,))
    monkeypatch.setattr(lm, "probe_train_step", lambda cfg, context: (1.0, 0.05))  # no fresh processes here
    res = lm.lm_demo(tmp_path, seconds=1, context=32, threads=1)
    configs = {}
    for name in ("hybrid", "softmax"):
        model, config = load_lm(tmp_path / name)
        configs[name] = config
        assert model.logit_bias is not None and config["train"]["output_bias_init"] == "unigram"
        for key in ("lr", "warmup", "min_lr_ratio", "batch_size"):
            assert config["train"][key] == lm.DEMO_TRAIN[key], key
        first = read_log(tmp_path / name / "log.jsonl")[0]["loss"] / LN2
        # one training window of 32 bytes scored by a model near the unigram: within 1 bit
        # of the held-out baseline (4.4), far from the 8 bits of a bias-free start
        assert abs(first - res["unigram_bpr"]) < 1.0, (name, first)
    assert configs["hybrid"]["model"]["exact"] is not None and configs["softmax"]["model"]["attention"] == "softmax"
    same = {k: v for k, v in configs["hybrid"]["model"].items() if k not in ("exact", "attention")}
    assert same == {k: v for k, v in configs["softmax"]["model"].items() if k not in ("exact", "attention")}
    per_run = ("steps", "eval_every", "checkpoint_every")  # each model's cap from its own probe
    train_cfgs = [{k: v for k, v in configs[n]["train"].items() if k not in per_run} for n in configs]
    assert train_cfgs[0] == train_cfgs[1]
    assert 3.5 < res["unigram_bpr"] < 5.0  # 4 windows of 32 bytes of English
