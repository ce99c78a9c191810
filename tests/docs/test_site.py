"""The documentation site builds strictly, and strictness is real: a broken link or a
missing API reference fails the build."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

for _mod in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
    pytest.importorskip(_mod, reason="the docs extra is not installed (pip install -e '.[docs]'; `make test` does)")


def _build(root: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(root / "mkdocs.yml"), "-d", str(site)],
        cwd=ROOT,  # mkdocstrings finds favor from here
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=300,
    )


def test_site_builds_strictly(tmp_path):
    r = _build(ROOT, tmp_path / "site")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "WARNING" not in r.stderr, r.stderr
    for page in ("index.html", "getting-started/index.html", "api/favor/index.html", "api/training/index.html"):
        assert (tmp_path / "site" / page).exists(), page
    api = (tmp_path / "site" / "api" / "favor" / "index.html").read_text()
    assert "favor.ops.api.attention" in api and "key_padding_mask" in api  # rendered from docstrings


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "copy"
    shutil.copytree(ROOT / "docs", root / "docs")
    text = (ROOT / "mkdocs.yml").read_text().replace("paths: [.]", f"paths: [{ROOT}, {root / 'src'}]")
    (root / "mkdocs.yml").write_text(text)
    # a module whose docstring documents a parameter the function does not have
    (root / "src").mkdir()
    (root / "src" / "badmod.py").write_text(
        'def f(x):\n    """Do.\n\n    Args:\n        y: not a parameter.\n    """\n'
    )
    return root


@pytest.mark.parametrize(
    "page, addition, complaint",
    [
        ("index.md", "\nSee [nowhere](no-such-page.md).\n", "no-such-page.md"),
        ("api/favor.md", "\n::: favor.no_such_function\n", "favor.no_such_function"),
        ("api/favor.md", "\n::: badmod.f\n", "Parameter 'y' does not appear"),
    ],
    ids=["broken-link", "missing-reference", "bad-docstring"],
)
def test_strict_build_fails_on(tmp_path, page, addition, complaint):
    root = _copy(tmp_path)
    with open(root / "docs" / page, "a") as f:
        f.write(addition)
    r = _build(root, tmp_path / "site")
    assert r.returncode != 0
    assert complaint in r.stdout + r.stderr
