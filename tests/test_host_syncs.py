"""Guards against new host syncs in the hot paths (CUDA readiness).

On a GPU, ``.item()``, ``.tolist()``, ``.cpu()``, ``bool(t)``, ``float(t)``, ``int(t)`` and
``if t:`` on device data stall the host until every queued kernel has run. The modules that
run per call (attention, features, modules, models, the Hugging Face attention function,
sequence parallelism) may have such a sync only where it is needed, and then say so with a
``host sync`` comment on the line or the line above. This test reads their source (ast) and
lists every unmarked candidate; a Python-number conversion (``float(scale)``,
``float("-inf")``) is not a candidate. On a GPU, tests/ops/test_device.py checks the
same at run time with torch.cuda.set_sync_debug_mode("error").
"""

import ast
from pathlib import Path

import torch

import favor
from favor.features.headwise import HeadwiseFeatureMap
from favor.hf.adapter import FavorAdapter

ROOT = Path(favor.__file__).parent
HOT = [
    *sorted((ROOT / "ops").glob("*.py")),
    *sorted((ROOT / "ops" / "local").glob("*.py")),
    *(ROOT / "features" / n for n in ("maps.py", "feature_map.py", "official.py", "buffer_flags.py")),
    *(ROOT / "nn" / n for n in ("attention.py", "rotary.py")),
    *(ROOT / "models" / n for n in ("performer.py", "block.py")),
    *(ROOT / "hf" / n for n in ("interface.py", "masks.py", "adapter.py")),
    *(ROOT / "distributed" / n for n in ("sequence.py", "rank_state.py", "collectives.py")),
]
SYNC_METHODS = {"item", "tolist", "cpu", "numpy"}
CONVERSIONS = {"bool", "float", "int"}
#: method calls that give Python values, never tensors: not a sync inside bool()/int()
PYTHON_VALUED = {"is_floating_point", "dim", "numel", "size", "element_size", "get", "startswith", "endswith"}


def _tensorish(node: ast.AST) -> bool:
    """Could this expression be a tensor? Calls (other than Python-valued ones) and subscripts
    of calls can; names, constants, attributes of shapes and arithmetic on them cannot be
    told apart statically, so only calls count (``bool(torch.isnan(x))``, ``float(x.sum())``)."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Call):
            f = sub.func
            if isinstance(f, ast.Name) and f.id in {
                "len",
                "round",
                "max",
                "min",
                "abs",
                "getattr",
                "isinstance",
                "tuple",
            }:
                continue
            if isinstance(f, ast.Attribute) and f.attr in PYTHON_VALUED:
                continue
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "math":
                continue
            return True
    return False


def _candidates(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr in SYNC_METHODS and not node.args:
                yield node.lineno, f".{f.attr}()"
            elif isinstance(f, ast.Name) and f.id in CONVERSIONS and node.args and _tensorish(node.args[0]):
                yield node.lineno, f"{f.id}(...)"
        elif isinstance(node, (ast.If, ast.While, ast.IfExp)):
            test = node.test.operand if isinstance(node.test, ast.UnaryOp) else node.test
            if isinstance(test, ast.Call) and isinstance(test.func, ast.Attribute):
                base = test.func.value
                if (isinstance(base, ast.Name) and base.id == "torch") or test.func.attr in {"any", "all"}:
                    yield node.lineno, "if <tensor>"


def unmarked(text: str) -> list[tuple[int, str]]:
    """(line, form) of every candidate without "host sync" on its line or the line above."""
    lines = text.splitlines()
    return sorted(
        (ln, what)
        for ln, what in _candidates(ast.parse(text))
        if "host sync" not in " ".join(lines[max(0, ln - 2) : ln])
    )


def unmarked_syncs(path: Path) -> list[str]:
    text = path.read_text()
    lines = text.splitlines()
    return [f"{path.relative_to(ROOT.parent)}:{ln}: {what}: {lines[ln - 1].strip()}" for ln, what in unmarked(text)]


def test_hot_paths_have_no_unmarked_host_syncs():
    missing = [p for p in HOT if not p.exists()]
    assert not missing, f"hot-path modules moved: {missing}"
    found = [f for p in HOT for f in unmarked_syncs(p)]
    assert not found, "host syncs without a `host sync` comment saying why:\n" + "\n".join(found)


def test_the_guard_sees_syncs():
    # a guard that cannot fail is no guard: each form it must catch, and the forms it must not
    text = (
        "import math, torch\n"
        "def f(x, s):\n"
        "    a = x.sum().item()\n"
        "    if torch.isnan(x).any():\n"
        "        pass\n"
        "    b = bool(x.isfinite().all())\n"
        "    c = float(x.max())\n"
        "    d = float(s) + float('-inf') + int(len(x.shape)) + float(math.sqrt(2))\n"
        "    if x.any():\n"
        "        pass\n"
        "    e = bool(x.max())  # host sync: needed for the test\n"
    )
    assert [ln for ln, _ in unmarked(text)] == [3, 4, 6, 7, 9]


def test_cached_buffer_flags_follow_every_change():
    # the flags that replaced per-call syncs must see fill_, copy_, load_state_dict and .to()
    fm = favor.FeatureMap("oprf", dim=4, num_features=8)
    assert not fm.has_fixed_rho()
    fm.rho.fill_(0.5)
    assert fm.has_fixed_rho()
    fm.load_state_dict({"rho": torch.tensor(float("nan"), dtype=torch.float64), "projection": fm.projection})
    assert not fm.has_fixed_rho()
    fm.rho.copy_(torch.tensor(1.0))
    fm = fm.to(torch.float64)
    assert fm.has_fixed_rho()
    head = HeadwiseFeatureMap("oprf", heads=2, dim=4, num_features=8)
    q = torch.randn(1, 2, 3, 4, dtype=torch.float64)
    a_data = head.oprf_a(q, q)
    head.set_head_rho(torch.tensor([0.3, 0.7], dtype=torch.float64))
    a_fixed = head.oprf_a(q, q)
    assert not torch.equal(a_data.expand_as(a_fixed), a_fixed) and a_fixed[0, 0] != a_fixed[0, 1]
    adapter = FavorAdapter(favor.FeatureMap("positive", dim=4, num_features=8), heads=2, dim=4)
    k = torch.randn(1, 2, 3, 4)
    assert adapter.transform(q.float(), k)[1] is k  # uncalibrated: identity
    adapter.set_reparametrisation(torch.ones(2, 4), 2 * torch.eye(4).expand(2, 4, 4))
    qa, kb = adapter.transform(q.float(), k)
    torch.testing.assert_close(qa, 2 * q.float())
    torch.testing.assert_close(kb, (k - 1) / 2)
