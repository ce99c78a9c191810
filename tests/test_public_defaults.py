"""Public defaults are part of the API: a change to one must be deliberate (this test and the
CHANGELOG change with it). Each default is checked twice: in the signature, and by what a
call without the argument does (so a default passed through to a helper cannot drift)."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

import favor
from favor.features import projections
from favor.models import PerformerConfig
from favor.ops.api import attention as attention_fn


def _defaults(fn) -> dict:
    return {
        k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not inspect.Parameter.empty
    }


def test_projection_defaults():
    assert _defaults(projections.gaussian_orthogonal)["norm"] == "chi"
    # chi norms: each row's length follows the chi distribution, not sqrt(d) (the paper's
    # "regularized" variant is norm="sqrt_d"): the rows do not all have length sqrt(d)
    w = projections.gaussian_orthogonal(64, 16, generator=torch.Generator().manual_seed(0))
    lengths = w.norm(dim=-1)
    assert not torch.allclose(lengths, torch.full_like(lengths, 16**0.5))
    w_sqrt = projections.gaussian_orthogonal(64, 16, norm="sqrt_d", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(w_sqrt.norm(dim=-1), torch.full((64,), 16**0.5))


def test_feature_map_defaults():
    d = _defaults(favor.FeatureMap.__init__)
    assert (d["projection"], d["norm"], d["stabilizer"]) == ("orthogonal", "chi", "exact")
    fm = favor.FeatureMap("positive", dim=16)
    assert fm.stabilizer == "exact"
    assert fm.projection.shape == (favor.default_num_features(16), 16)


def test_attention_defaults():
    d = _defaults(attention_fn)
    assert d == {
        "causal": False,
        "key_padding_mask": None,
        "scale": None,
        "chunk_size": None,
        "initial_state": None,
        "return_state": False,
        "exact": None,
        "far_log_gain": None,
    }
    assert _defaults(favor.step) == {"scale": None, "exact": None, "far_log_gain": None}
    t = favor.ExactTerms(8)
    assert (t.sinks, t.block) == (0, 1)


def test_model_config_defaults():
    got = {f.name: f.default for f in dataclasses.fields(PerformerConfig) if f.default is not dataclasses.MISSING}
    assert got == {
        "dim": 256,
        "depth": 4,
        "heads": 4,
        "mlp_ratio": 4.0,
        "dropout": 0.0,
        "attention": "favor",
        "kernel": "positive",
        "num_features": None,
        "projection": "orthogonal",
        "position": "rotary",
        "max_len": 2048,
        "tie_embeddings": True,
        "chunk_size": None,
        "seed": 0,
        "exact": None,
        "far_gain": None,
        "output_bias": False,
    }


def test_decoder_recipe_defaults():
    pytest.importorskip("transformers")
    from favor.hf.linearize import LinearizeConfig

    cfg = LinearizeConfig()
    # the measured choice (benchmarks/results/llm_distill.md, stop 24): a 512-key window and
    # 4 sinks exact, windows only (blocks would stop FavorCache decoding), derf with M=256,
    # only the adapters train and the far gain at its own rate
    assert (cfg.exact_window, cfg.exact_sinks, cfg.exact_block) == (512, 4, 1)
    assert (cfg.kernel, cfg.num_features, cfg.train) == ("derf", 256, "adapters")
    assert (cfg.adapter_lr, cfg.gain_lr) == (1e-3, 0.2)
    # the key side tied per key/value group (stop 26: the same perplexity, faster decoding);
    # the CLI leaves it to the recipe unless told
    assert cfg.tie_keys is True
    import argparse

    from favor.commands.distill_lm import add_decoder_arguments

    parser = argparse.ArgumentParser()
    add_decoder_arguments(parser)
    assert parser.parse_args([]).tie_keys is None
    assert parser.parse_args(["--no-tie-keys"]).tie_keys is False
