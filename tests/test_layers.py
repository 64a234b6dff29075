"""The layout rule (docs/architecture.md): subpackages import one way only, and nothing imports in a circle.

ground ← {methods, io} ← quantize ← formats ← {quality, release} ← pipeline ← faces ← tasks ← flows.
Every import is read with ``ast`` — function-local ones too — so a circle cannot hide inside a function.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"

#: Layer of each top-level part; siblings share a number and may not import each other.
LAYERS: dict[str, int] = {
    "turboquant": 0, "turboquant._version": 0, "turboquant.errors": 0, "turboquant.fsutil": 0,
    "turboquant.tensor": 0, "turboquant.faults": 0, "turboquant.device": 0,
    "turboquant.methods": 1, "turboquant.io": 1,
    "turboquant.quantize": 2,
    "turboquant.formats": 3,
    "turboquant.quality": 4, "turboquant.release": 4,
    "turboquant.pipeline": 5,
    "turboquant.api": 6, "turboquant.cli": 6, "turboquant.cli_support": 6, "turboquant.demo": 6,
    "turboquant.recommend": 6,
    "tasks": 7,
    "flows": 8,
}
#: Parts that may import each other although they share a layer (the ground and the faces are single modules).
SAME_LAYER_OK = {0, 6}
#: Orchestration libraries the engine never imports (tasks/ and flows/ wrap them).
ENGINE_FORBIDDEN = ("prefect", "dvc")


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for base, root in ((SRC, "turboquant"), (ROOT, "tasks"), (ROOT, "flows")):
        for f in (base / root).rglob("*.py"):
            name = ".".join(f.relative_to(base).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = f
    return found


MODULES = modules()


def part_of(module: str) -> str:
    """The entry of ``LAYERS`` a module belongs to (its longest matching prefix)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in LAYERS:
            return prefix
    raise KeyError(module)


def imports_of(module: str) -> list[tuple[str, int]]:
    """``(imported name, line)`` for every import statement in the module, at any depth."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                full = f"{target}.{a.name}"
                out.append((full if full in MODULES else target, node.lineno))
    return out


def our_edges() -> dict[str, set[tuple[str, int]]]:
    """Module -> modules of ours it imports (a parent package being imported by its own child is not an edge:
    Python has already imported it)."""
    edges: dict[str, set[tuple[str, int]]] = {m: set() for m in MODULES}
    for m in MODULES:
        for name, line in imports_of(m):
            t = name
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t != m and not m.startswith(t + "."):
                edges[m].add((t, line))
    return edges


EDGES = our_edges()


def circles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w, _ in EDGES[v]:
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
                found.append(sorted(comp))

    for v in sorted(MODULES):
        if v not in index:
            visit(v)
    return found


def violations() -> list[str]:
    """Imports that point against the rule: upward, or between siblings."""
    bad = []
    for m, targets in EDGES.items():
        pm = part_of(m)
        for t, line in sorted(targets):
            pt = part_of(t)
            if pm == pt:
                continue
            lm, lt = LAYERS[pm], LAYERS[pt]
            if lt < lm or (lt == lm and lm in SAME_LAYER_OK):
                continue
            kind = "sibling" if lt == lm else "upward"
            bad.append(f"{MODULES[m].relative_to(ROOT)}:{line}: {m} imports {t} ({kind}: {pm} -> {pt})")
    return bad


def test_every_module_has_a_layer():
    unplaced = []
    for m in MODULES:
        try:
            part_of(m)
        except KeyError:
            unplaced.append(m)
    assert unplaced == [], f"modules outside every layer (add them to a subpackage): {unplaced}"


def test_no_import_circles():
    assert circles() == []


def test_imports_point_down_the_layers():
    assert violations() == []


@pytest.mark.parametrize("lib", ENGINE_FORBIDDEN)
def test_engine_never_imports_orchestration(lib):
    offenders = [f"{MODULES[m].relative_to(ROOT)}:{line}" for m in MODULES if m.startswith("turboquant")
                 for name, line in imports_of(m) if name == lib or name.startswith(lib + ".")]
    assert offenders == []


def test_the_checker_catches_a_circle_and_an_upward_import(monkeypatch):
    """The rule has teeth: a fabricated methods -> io edge and an io <-> quantize loop are both reported."""
    fake = {m: set(e) for m, e in EDGES.items()}
    fake["turboquant.methods.rtn"].add(("turboquant.io.model", 1))
    fake["turboquant.io.model"].add(("turboquant.quantize.runner", 1))
    monkeypatch.setattr(sys.modules[__name__], "EDGES", fake)
    assert any("methods.rtn imports turboquant.io.model (sibling" in v for v in violations())
    assert any("io.model imports turboquant.quantize.runner (upward" in v for v in violations())
    assert any({"turboquant.io.model", "turboquant.quantize.runner"} <= set(c) for c in circles())
