"""Old module paths, kept importable after the 0.2 layout change (see CHANGELOG.md).

``favor.train``, ``favor.train_demo``, ``favor.checkpoint``, ``favor.bench``,
``favor.approximation`` and ``favor.projections`` moved into packages that say what they
are. A meta-path finder maps each old name to the module that now holds its code, so
``import favor.train`` and ``from favor.checkpoint import save_checkpoint`` keep working
(the same module object: no copies, no warnings at import). New code should import the
new paths.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

#: old dotted name -> new dotted name
MOVED: dict[str, str] = {
    "favor.train": "favor.training.loop",
    "favor.train_demo": "favor.training.demo",
    "favor.checkpoint": "favor.training.checkpoint",
    "favor.bench": "favor.benchmarking.timing",
    "favor.approximation": "favor.benchmarking.approximation",
    "favor.projections": "favor.features.projections",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        self._spec = module.__spec__
        return module

    def exec_module(self, module) -> None:
        # the target module is already executed; importlib has just overwritten its
        # __spec__ with the alias's: give it back its own
        module.__spec__ = self._spec


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new = MOVED.get(fullname)
        if new is None:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(new))


def install() -> None:
    """Put the finder first on ``sys.meta_path``, once."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder())  # before editable-install finders
