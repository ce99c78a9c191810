"""The package layout: the training modules import one way, the fast paths share helpers
through _chunking, no import cycles, and the exact-terms kernels live in the core."""

import ast
import importlib
from pathlib import Path

import pytest

import favor

ROOT = Path(favor.__file__).parent


def test_old_module_paths_are_gone():
    """The 0.2 layout's aliases (favor.train, favor.checkpoint, ...) were removed: a package
    never released needs none (CHANGELOG)."""
    for old in ("favor.train", "favor.train_demo", "favor.checkpoint", "favor.bench", "favor.approximation"):
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(old)
    assert favor.projections is importlib.import_module("favor.features.projections")


def _imported_modules(path: Path) -> set[str]:
    """Module names a file imports (relative imports resolved against favor.*)."""
    pkg = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = pkg.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_training_loop_does_not_import_the_demo():
    assert not any(n.startswith("favor.training.demo") for n in _imported_modules(ROOT / "training" / "loop.py"))
    assert "favor.training.loop" in _imported_modules(ROOT / "training" / "demo.py")


def test_no_private_helpers_imported_across_fast_paths():
    """causal_fast and recurrent take the shared helpers from _chunking, not from
    bidirectional_fast's private names."""
    for name in ("causal_fast.py", "recurrent.py"):
        tree = ast.parse((ROOT / "attention" / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "bidirectional_fast":
                assert not [a.name for a in node.names if a.name.startswith("_")], name


def test_no_loose_modules_at_the_top_level():
    loose = {p.name for p in ROOT.glob("*.py")}
    assert loose == {"__init__.py", "cli.py"}, f"top-level modules belong in packages (DESIGN.md 2): {loose}"


def test_py_typed_marker_ships():
    assert (ROOT / "py.typed").exists()


def _module_graph() -> dict[str, set[str]]:
    """favor module -> the favor modules it imports anywhere in its file (function-level
    imports included: a cycle hidden inside a function is still a cycle)."""
    files = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in files.items():
        deps = set()
        for mod in _imported_modules(path):
            while mod and mod not in files:  # a name imported from a module -> that module
                mod = mod.rpartition(".")[0]
            if mod and mod != name and mod.startswith("favor."):
                deps.add(mod)
        graph[name] = deps
    return graph


def test_no_import_cycles_between_modules():
    """Layers point one way: no module reaches itself through its imports, except through
    its own package's __init__ (which imports its submodules by design)."""
    graph = _module_graph()
    cycles = []

    def visit(node, path, seen):
        for dep in graph[node]:
            if dep == path[0]:
                ring = path + [dep]
                if not any(m == p or p.startswith(m + ".") for m, p in zip(ring[1:], ring[:-1], strict=True)):
                    cycles.append(" -> ".join(ring))
            elif dep not in seen and len(path) < 8:
                seen.add(dep)
                visit(dep, path + [dep], seen)

    for start in sorted(graph):
        if start.startswith(("favor.attention", "favor.hf", "favor.features", "favor.nn", "favor.models")):
            visit(start, [start], {start})
    assert not cycles, cycles[:5]


def test_exact_local_terms_live_in_the_core():
    """No attention kernel stays in favor/hf: the exact terms are favor.attention.local's."""
    assert not list((ROOT / "hf").glob("local*.py"))
    assert (ROOT / "attention" / "local" / "causal_fast.py").exists()
    assert not (ROOT / "hf" / "cross.py").exists()


def test_library_does_not_import_the_commands():
    """A command parses arguments and calls the library; nothing in the library reaches back
    into favor.commands (its logic would then live in a command)."""
    offenders = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] == "commands" or rel == Path("cli.py"):
            continue
        found = sorted(n for n in _imported_modules(path) if n == "favor.commands" or n.startswith("favor.commands."))
        if found:
            offenders.append(f"{rel}: {found}")
    assert not offenders, offenders


def test_one_training_loop():
    """Distributed training is favor.training.train with a split strategy, not a second loop:
    favor.distributed.train takes none of the loop's parts (checkpoint writes, the schedule,
    the batches, evaluation)."""
    names = _imported_modules(ROOT / "distributed" / "train.py")
    assert "favor.training.loop.train" in names and "favor.training.loop.Split" in names
    parts = ("save_checkpoint", "set_learning_rate", "step_batch", "evaluate_bits", "restore_run", "finish_run")
    assert not [n for n in names if n.rpartition(".")[2] in parts]
