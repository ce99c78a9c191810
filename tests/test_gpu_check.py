"""benchmarks/gpu_check.sh, the prepared GPU check, in its CPU dry run: the script runs its
stages (environment, device tests, benchmark, summary) and writes the JSON it promises, so
that the day a GPU is available it runs as written."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_dry_run_on_cpu_writes_its_json(tmp_path):
    run = subprocess.run(
        ["bash", str(SCRIPT), "--device", "cpu", "--quick", "--out", str(tmp_path), "--python", sys.executable],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["ok"] and summary["env"]["device"] == "cpu"
    assert summary["tests"]["tests"] >= 1 and summary["tests"]["failures"] == summary["tests"]["errors"] == 0
    bench = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert all(c["ok"] for checks in bench["checks"].values() for c in checks.values())
    modes = {r["mode"] for r in bench["rows"] if r["favor_ms"] > 0 and r["sdpa_ms"] > 0}
    assert modes == {"bidirectional fwd", "causal fwd+bwd"}
    assert [r["favor_ms_per_token"] > 0 and r["sdpa_kv_ms_per_token"] > 0 for r in bench["decode"]] == [True]


@pytest.mark.skipif(torch.cuda.is_available() or shutil.which("bash") is None, reason="for a machine without CUDA")
def test_gpu_check_refuses_cuda_without_a_gpu(tmp_path):
    # a GPU check that quietly ran on the CPU would report a false pass
    run = subprocess.run(
        ["bash", str(SCRIPT), "--out", str(tmp_path), "--python", sys.executable],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 3 and "is False" in run.stderr
    assert not (tmp_path / "gpu_check.json").exists()
