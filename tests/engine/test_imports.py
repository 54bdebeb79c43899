"""The engine's import graph, read from the sources: no circles (deferred imports included), layers kept."""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[2] / "studio" / "engine"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ENGINE.parent.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Engine modules ``path`` imports anywhere (functions too), except under ``if TYPE_CHECKING:``."""
    found: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            if "TYPE_CHECKING" in ast.unparse(node.test):
                for child in node.orelse:
                    self.visit(child)
                return
            self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            found.update(alias.name for alias in node.names)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            assert not node.level, f"{path}: relative import"
            found.add(node.module or "")
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pkg import module`

    Visitor().visit(ast.parse(path.read_text(encoding="utf-8")))
    return {m for m in found if m in modules} - {_module_name(path)}


def _graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in ENGINE.rglob("*.py")}
    return {name: _imports(path, set(paths)) for name, path in paths.items()}


def _cycle_from(graph: dict[str, set[str]], start: str) -> list[str] | None:
    stack = [(start, [start])]
    seen = set()
    while stack:
        node, trail = stack.pop()
        for nxt in graph[node]:
            if nxt == start:
                return trail + [start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, trail + [nxt]))
    return None


def test_no_import_circles_in_the_engine():
    graph = _graph()
    cycles = [c for m in sorted(graph) if (c := _cycle_from(graph, m))]
    assert cycles == [], " | ".join(" → ".join(c) for c in cycles)


def test_layers_nothing_imports_the_trainer_and_checkpoint_does_not_inspect():
    graph = _graph()
    assert [m for m, deps in graph.items() if "studio.engine.trainer" in deps] == []
    assert "studio.engine.inspection" not in graph["studio.engine.checkpoint"]
    # The registry and the protocol stay import-light: the job configuration lists the family names.
    # (jsonfile, the safe JSON reader a folder's model index is read with, is standard-library only.)
    assert graph["studio.engine.families"] <= {"studio.engine.families.base", "studio.engine.jsonfile"}
    assert graph["studio.engine.jsonfile"] == set()
    assert graph["studio.engine.families.base"] <= {"studio.engine.jsonfile"}
