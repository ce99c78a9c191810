"""The compiled decoding step (fused_native.cpp: fused_step's tokens, steady state and before
the ring is full), built on first use.

``load()`` compiles favor/ops/local/fused_native.cpp with torch.utils.cpp_extension (a C++
compiler and ninja: ``pip install ninja``; ~30 s once, then cached under
``TORCH_EXTENSIONS_DIR``, default ~/.cache/torch_extensions) and returns the module, or
None where it cannot: then fused_step keeps its PyTorch ops (the same numbers to round-off,
~0.47 ms instead of ~0.2 ms per SmolLM2 layer and token in a model, W=512). ``FAVOR_NATIVE=0`` turns it off.
The build targets the CPU it runs on (-march=native), so the cache name carries a digest
of the source and of the CPU's flags.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import sysconfig
from pathlib import Path

__all__ = ["load", "enabled", "buildable"]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("fused_native.cpp")


def enabled() -> bool:
    """Whether the compiled step may be used (``FAVOR_NATIVE`` is not ``0``)."""
    return os.environ.get("FAVOR_NATIVE", "1") != "0"


def _cpu_flags() -> bytes:
    try:
        with open("/proc/cpuinfo", "rb") as f:
            return next((line for line in f if line.startswith(b"flags")), b"")
    except OSError:
        return b""


@functools.cache
def _build():
    try:
        import torch.utils.cpp_extension as cpp_extension

        if shutil.which("ninja") is None:  # PyPI's ninja, its binary off PATH (a venv not activated)
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        digest = hashlib.sha1(SOURCE.read_bytes() + _cpu_flags()).hexdigest()[:12]
        return cpp_extension.load(
            name=f"favor_fused_{digest}",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-march=native"],
            verbose=False,
        )
    except Exception as err:  # no compiler, no ninja, a failed build: the PyTorch step stays
        log.warning("favor: the compiled decoding step is unavailable, using PyTorch ops (%s)", err)
        return None


def buildable() -> bool:
    """Whether this machine has what the build needs: Python's headers and a C++ compiler
    (ninja comes from PyPI). Where it does, a failed build is a defect, not the machine."""
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    return headers.exists() and (shutil.which(os.environ.get("CXX", "c++")) is not None)


def load():
    """The compiled module (``step``), or None (turned off, or it cannot be built)."""
    return _build() if enabled() else None
