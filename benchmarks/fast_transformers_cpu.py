"""Build and install the CPU causal-product kernel of pytorch-fast-transformers 0.4.0, the
kernel performer-pytorch's causal mode uses when it can import it (its setup.py builds
CUDA extensions unconditionally, so `pip install` fails on a CPU-only machine).

    python -m benchmarks.fast_transformers_cpu     # then benchmarks see
                                                   # "performer-pytorch-causal-ft"

Downloads the sdist from PyPI, compiles only fast_transformers/causal_product/
causal_product_cpu.cpp with its own flags (-fopenmp -ffast-math) and installs a package
holding just fast_transformers.causal_product into the running interpreter's environment.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

VERSION = "0.4.0"

SETUP = """
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

setup(
    name="pytorch-fast-transformers-causal-cpu",
    version="{version}",
    packages=["fast_transformers", "fast_transformers.causal_product"],
    ext_modules=[
        CppExtension(
            "fast_transformers.causal_product.causal_product_cpu",
            sources=["fast_transformers/causal_product/causal_product_cpu.cpp"],
            extra_compile_args=["-fopenmp", "-ffast-math"],
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={{"build_ext": BuildExtension}},
)
"""


def _sdist_url() -> str:
    with urllib.request.urlopen("https://pypi.org/pypi/pytorch-fast-transformers/json", timeout=60) as r:
        meta = json.load(r)
    files = meta["releases"].get(VERSION) or meta["urls"]
    return next(u["url"] for u in files if u["packagetype"] == "sdist" and VERSION in u["filename"])


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        archive = tmp / "sdist.tar.gz"
        urllib.request.urlretrieve(_sdist_url(), archive)
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        src = tmp / f"pytorch-fast-transformers-{VERSION}" / "fast_transformers"
        pkg = tmp / "pkg"
        (pkg / "fast_transformers" / "causal_product").mkdir(parents=True)
        shutil.copy(src / "__init__.py", pkg / "fast_transformers" / "__init__.py")
        for name in ("__init__.py", "causal_product_cpu.cpp"):
            shutil.copy(src / "causal_product" / name, pkg / "fast_transformers" / "causal_product" / name)
        (pkg / "setup.py").write_text(SETUP.format(version=VERSION))
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", str(pkg)]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    from fast_transformers.causal_product import CausalDotProduct  # noqa: F401

    print("installed fast_transformers.causal_product (CPU kernel)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
