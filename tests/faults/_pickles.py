"""Pickles that would run code when loaded: their __reduce__ creates a marker file. A test
that finds no marker after loading proves no pickle was executed."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch


class _Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling calls open(marker, "w"): the file appears


def raw_pickle(marker: Path) -> bytes:
    """A plain pickle of a dict holding the payload."""
    return pickle.dumps({"weight": _Payload(marker)})


def torch_save(marker: Path) -> bytes:
    """torch.save's zip format with the payload inside (what a .bin / .pt file is)."""
    buf = io.BytesIO()
    torch.save({"weight": _Payload(marker)}, buf)
    return buf.getvalue()


def check_payload_runs(tmp: Path) -> None:
    """The payload is real: plain pickle.loads does create the marker."""
    marker = tmp / "proof"
    pickle.loads(raw_pickle(marker))
    assert marker.exists()
    marker.unlink()
