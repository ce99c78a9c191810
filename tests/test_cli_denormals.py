"""The CLI flushes subnormal floats to zero while a command runs (--keep-denormals keeps them),
and gives torch's default back afterwards."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from favor import cli

TINY = 1e-39  # subnormal in float32 (the smallest normal is 1.18e-38)


def _flushed() -> bool:
    return (torch.tensor([TINY]) * 1.0).item() == 0.0


@pytest.fixture
def probe(monkeypatch):
    seen = []
    module = types.ModuleType("favor.commands._denormal_probe")
    module.add_arguments = lambda parser: None
    module.run = lambda args: seen.append(_flushed()) or 0
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(cli.COMMANDS, "probe", ("_denormal_probe", "test only"))
    return seen


@pytest.mark.skipif(not torch.set_flush_denormal(False), reason="this CPU cannot flush subnormals")
@pytest.mark.parametrize("flag, expect", [([], True), (["--keep-denormals"], False)])
def test_a_command_runs_with_subnormals_flushed_unless_asked(probe, flag, expect):
    assert not _flushed()
    assert cli.main([*flag, "probe"]) == 0
    assert probe == [expect]
    assert not _flushed()  # the default again after the command
