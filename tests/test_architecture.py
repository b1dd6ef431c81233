"""The house's floor plan, checked: every import runs down (from a higher room to a lower one, or
within one room), and no room's modules import each other in a circle.

Every import counts: module level and inside functions (a lazy import is still a dependency), but
not `if TYPE_CHECKING:` blocks (annotations only). The rooms and their floors are the table below;
a new module must be placed in it, so that a new dependency is a decision, not an accident.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "llmquant"

# room -> floor (a room may import rooms of a lower floor, and itself). Rooms are module prefixes;
# the longest matching prefix decides.
FLOORS = {
    "llmquant.version": 0,
    "llmquant.errors": 0,
    "llmquant.ui": 0,
    "llmquant.output": 1,
    "llmquant.devices": 1,
    "llmquant.provenance": 1,
    "llmquant.safetensors_io": 2,
    "llmquant.models.layer_maps": 2,
    "llmquant.models.loading": 2,
    "llmquant.models.streaming": 3,
    "llmquant.data": 3,
    "llmquant.core": 3,
    "llmquant.layouts": 4,
    "llmquant.methods": 5,
    "llmquant.formats": 5,
    "llmquant.runtime": 6,
    "llmquant.recipe": 6,
    "llmquant.resume": 7,
    "llmquant.evaluate": 7,
    "llmquant.export": 7,
    "llmquant.hf_quantizer": 7,
    "llmquant.quantize": 8,
    "llmquant.bench": 8,
    "llmquant.train": 8,
    "llmquant.cli": 9,
    "llmquant": 10,  # the package root: `llmquant.load`
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room(module: str) -> str:
    return max((r for r in FLOORS if module == r or module.startswith(r + ".")), key=len)


def imports(path: Path) -> set[str]:
    """llmquant modules imported by the file, outside `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text())
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    return {name for name in found if name in modules}


def graph() -> dict[str, set[str]]:
    return {module_name(path): imports(path) for path in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_room():
    assert all(room(module) for module in graph())


def test_no_import_runs_up_a_floor():
    upward = []
    for source, targets in graph().items():
        for target in targets:
            a, b = room(source), room(target)
            if a != b and FLOORS[b] >= FLOORS[a] and not source.startswith(target + "."):
                upward.append(f"{source} (floor {FLOORS[a]}) -> {target} (floor {FLOORS[b]})")
    assert upward == []


def test_no_import_cycle():
    edges = {source: {t for t in targets if t != source} for source, targets in graph().items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if nxt.startswith(node + ".") or node.startswith(nxt + "."):
                continue  # a package and its own modules (`from pkg import module`)
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]) if nxt in path else f"{node} -> {nxt}")
            elif state.get(nxt) is None:
                walk(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            walk(node, [node])
    assert cycles == []


def test_the_checker_sees_lazy_imports_and_ignores_type_checking():
    probe = PACKAGE / "_architecture_probe.py"  # in the package, so that its imports resolve
    probe.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from llmquant.cli import app\n"
        "def f():\n    from llmquant.recipe import Recipe\n"
    )
    try:
        found = imports(probe)
    finally:
        probe.unlink()
    assert "llmquant.recipe" in found and "llmquant.cli" not in found
