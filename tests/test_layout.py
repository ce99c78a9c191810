"""The package layout: the training modules import one way, favor.attention is a plain
function, no import cycles, no private names imported across modules, imports at the top
except optional dependencies, and the exact-terms kernels live in the core."""

import ast
import importlib
import sys
import types
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


def test_attention_is_a_plain_function():
    """favor.attention is the function favor.ops.api.attention, not a module whose class was
    swapped to make it callable; the subpackage it came from is favor.ops."""
    assert isinstance(favor.attention, types.FunctionType)
    assert favor.attention is importlib.import_module("favor.ops.api").attention
    assert favor.step is importlib.import_module("favor.ops.recurrent").step
    assert not (ROOT / "attention").exists() and (ROOT / "ops" / "api.py").exists()
    tricks = [n for n, m in list(sys.modules.items()) if n.startswith("favor") and type(m) is not types.ModuleType]
    assert not tricks, f"modules whose class was swapped: {tricks}"


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
        if start.startswith(("favor.ops", "favor.hf", "favor.features", "favor.nn", "favor.models")):
            visit(start, [start], {start})
    assert not cycles, cycles[:5]


def test_exact_local_terms_live_in_the_core():
    """No attention kernel stays in favor/hf: the exact terms are favor.ops.local's."""
    assert not list((ROOT / "hf").glob("local*.py"))
    assert (ROOT / "ops" / "local" / "causal_fast.py").exists()
    assert not (ROOT / "hf" / "cross.py").exists()


#: the top-level modules a function may import: optional dependencies (pyproject extras), so
#: that favor works, and ``import favor`` stays fast, without them
OPTIONAL = {
    "transformers",  # extras hf / llm
    "tokenizers",  # comes with transformers
    "matplotlib",  # extra plot
    "performer_pytorch",  # extra compare (peers)
    "reformer_pytorch",
    "linformer",
    "local_attention",
    "rdata",  # extra paper
    "ninja",  # the compiled decoding step's build (extra dev), from PyPI where PATH has none
}
#: modules of required packages imported where used because importing them costs: the
#: compiled decoding step's builder pulls in setuptools (~0.25 s, every `import favor`)
LAZY = {"torch.utils.cpp_extension"}
#: favor.hf needs transformers: a module outside it may import it where it is used
OPTIONAL_FAVOR = ("favor.hf",)


def _module_name(path: Path) -> tuple[str, str]:
    """(module name, its package) of a file under favor/."""
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), ".".join(parts[:-1])
    return ".".join(parts), ".".join(parts[:-1])


def _import_targets(path: Path, node: ast.AST) -> list[str]:
    """The modules an import statement names, relative imports resolved."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not node.level:
        return [node.module]
    _, pkg = _module_name(path)
    base = pkg.split(".")
    base = base[: len(base) - node.level + 1]
    return [".".join(base + ([node.module] if node.module else []))]


def _function_level_imports(tree: ast.AST):
    """Import statements inside a function (at any depth)."""
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    yield node


def test_imports_at_the_top_except_optional_dependencies():
    """An import inside a function is a hidden arrow: every import of favor/ sits at the top
    of its module, except an optional dependency's (``OPTIONAL``; favor.hf from outside it),
    imported where it is used so that favor runs without it. A lazy import that breaks a
    cycle is fixed by putting the code where it belongs."""
    hidden = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = str(path.relative_to(ROOT.parent))
        me, _ = _module_name(path)
        for node in set(_function_level_imports(ast.parse(path.read_text()))):
            for mod in _import_targets(path, node):
                if mod.split(".")[0] in OPTIONAL or mod in LAZY:
                    continue
                if any(mod == o or mod.startswith(o + ".") for o in OPTIONAL_FAVOR) and not me.startswith("favor.hf"):
                    continue
                hidden.append(f"{rel}:{node.lineno} {ast.unparse(node)}")
    assert not hidden, "\n".join(sorted(hidden))


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_private_names_imported_across_modules():
    """A name with a leading underscore is private to its file: no ``from X import _name``
    of another module's private name. A private module (``pkg/_mod.py``) is private to its
    package: only modules of ``pkg`` itself import it (``from . import _mod``,
    ``from ._mod import f``). A helper several modules need is public where it belongs
    (as flash-linear-attention's ``fla/ops/utils/``): ``favor.ops.chunking``, ``favor.ops.checks``."""
    crossing = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = str(path.relative_to(ROOT.parent))
        me, pkg = _module_name(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for mod in _import_targets(path, node):
                names = [mod]
                if isinstance(node, ast.ImportFrom):
                    names += [f"{mod}.{a.name}" for a in node.names]
                for full in names:
                    parts = full.split(".")
                    for i, part in enumerate(parts):
                        if not _private(part):
                            continue
                        owner = ".".join(parts[:i])
                        is_module = (ROOT.parent / Path(*parts[: i + 1])).with_suffix(".py").exists() or (
                            ROOT.parent / Path(*parts[: i + 1])
                        ).is_dir()
                        if owner != pkg if is_module else owner != me:
                            crossing.append(f"{rel}:{node.lineno} {ast.unparse(node)}")
    assert not crossing, "\n".join(sorted(set(crossing)))


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


def test_the_data_layer_imports_nothing_above_it():
    """favor.data (corpora, tokenizers, model loaders) sits beside the core: it imports no
    other part of favor (the KJV extract and Jane Austen's reader live in it, not in favor.hf
    or favor.paper)."""
    graph = _module_graph()
    up = {m: sorted(d for d in deps if not d.startswith("favor.data")) for m, deps in graph.items()}
    assert not {m: d for m, d in up.items() if m.startswith("favor.data") and d}


def test_readme_is_a_front_page():
    """The README stays a front page (issue 25: about 150 lines, at most 160): the two
    commands first, results tables in the docs."""
    readme = (ROOT.parent / "README.md").read_text().splitlines()
    assert len(readme) <= 160, f"README.md has {len(readme)} lines; move detail to docs/ (at most 160)"
    assert readme[2] == "```bash" and readme[3].startswith("make demo") and readme[4].startswith("make test")
