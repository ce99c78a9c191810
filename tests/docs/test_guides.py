"""Every python block in the guides (docs/*.md) and the README runs, at the tiny sizes the
pages use, or is marked not runnable with a reason (convention in tests/docs/_blocks.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ._blocks import NON_PYTHON, blocks

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]


def _id(p: Path) -> str:
    return str(p.relative_to(ROOT))


def test_there_are_guides_with_code():
    assert len(PAGES) >= 12
    assert sum(b.lang == "python" for p in PAGES for b in blocks(p)) >= 20


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_every_block_is_python_or_declared(page):
    for b in blocks(page):
        where = f"{_id(page)}:{b.line}"
        assert b.lang == "python" or b.lang in NON_PYTHON, f"{where}: fence needs python/bash/text/toml/json"
        if b.not_run is not None:
            assert b.lang == "python", f"{where}: only python blocks take a not-run mark"
            assert len(b.not_run) >= 10, f"{where}: a not-run mark needs a reason"


@pytest.mark.parametrize("page", [p for p in PAGES if any(b.lang == "python" for b in blocks(p))], ids=_id)
def test_python_blocks_run(page, tmp_path, monkeypatch, capsys):
    if page.name == "hf.md":
        pytest.importorskip("transformers", reason="the Hugging Face guide needs the `hf` extra")
    monkeypatch.chdir(tmp_path)  # blocks may write files
    namespace: dict = {"__name__": "__docs__"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for b in blocks(page):
            if b.lang != "python" or b.not_run is not None:
                continue
            code = compile(b.code, f"{_id(page)}:{b.line}", "exec")
            try:
                exec(code, namespace)
            except Exception as e:  # say which block failed
                raise AssertionError(f"{_id(page)}, block at line {b.line} failed: {e!r}") from e
    finally:
        torch.set_num_threads(threads)
