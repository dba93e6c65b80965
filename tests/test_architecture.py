"""The package's shape: no import cycles, no module importing a higher layer, registries complete after
``import metadyn``, and the front door ``import metadyn as md`` resolving every name it lists."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "metadyn"

# Lower layers never import higher ones (function-local imports included).
LAYERS = [
    ("metadyn.errors",),
    ("metadyn.registry", "metadyn.config"),
    ("metadyn.core",),
    ("metadyn.data",),
    ("metadyn.meta", "metadyn.consistency", "metadyn.attention", "metadyn.datafree", "metadyn.interop"),
    ("metadyn.runner",),
    ("metadyn.bench", "metadyn.cli", "metadyn"),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every metadyn module -> the metadyn modules it imports anywhere in its source."""
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        deps = set()
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative import
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module
                for a in node.names:
                    deps.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in files else mod)
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def _layer(module: str) -> int:
    best = (-1, -1)  # (prefix length, layer)
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best[0]:
                best = (len(p), i)
    assert best[1] >= 0, f"{module} is in no layer"
    return best[1]


def test_no_import_cycles():
    graph = import_graph()
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_module_imports_a_higher_layer():
    bad = [f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
           for m, deps in import_graph().items() for d in deps
           if _layer(d) > _layer(m) and not (m.startswith(d + ".") or d == "metadyn")]
    assert not bad, "\n".join(bad)


def test_registries_are_complete_after_import_metadyn():
    code = ("import metadyn\nfrom metadyn.registry import ALL\n"
            "print({k: len(r) for k, r in ALL.items()})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    counts = eval(out)  # noqa: S307 - our own subprocess's dict
    assert counts["backbones"] >= 5 and counts["methods"] >= 6 and counts["task kinds"] >= 8
    assert counts["datasets"] >= 5 and counts["benchmarks"] >= 4 and counts["policies"] >= 4


def test_import_metadyn_pulls_no_optional_package():
    code = ("import sys, metadyn\n"
            "bad = [m for m in ('torchvision', 'matplotlib', 'learn2learn', 'higher', 'sklearn', 'scipy') "
            "if m in sys.modules]\nprint(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


@pytest.mark.parametrize("name", __import__("metadyn").__all__)
def test_front_door_resolves_every_name(name):
    import metadyn as md

    assert getattr(md, name) is not None
