"""No import circles between segbook's and stunet's modules, counting imports inside functions and imports for type
checking only too: a lazy import, or a type named under `if TYPE_CHECKING:`, that only dodges a cycle is still one
(the two modules need each other; a value type they share belongs in a module below both)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("segbook", "stunet")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `name` imports; `from package import module` counts as the module."""
    tree = ast.parse(path.read_text())
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                        for a in node.names}
    resolved = set()
    for target in targets:
        while target and target not in known:
            target = target.rpartition(".")[0]
        # a package's __init__ importing its own submodules is how packages are built, not a circle
        if target and target != name and not target.startswith(f"{name}."):
            resolved.add(target)
    return resolved


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph, as the modules along it, or None."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module], _ = "open", path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        state[module], _ = "done", path.pop()
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_no_module_imports_itself_through_others():
    known = _modules()
    graph = {name: _imports(name, path, known) for name, path in known.items()}
    assert len(graph) > 50
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_checker_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_imports_for_type_checking_count(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from segbook.batch.jobs import Job\n")
    assert _imports("m", module, {"m": module, "segbook.batch.jobs": module}) == {"segbook.batch.jobs"}


def _imported_test_modules(source: str) -> set[str]:
    """The test modules (`test_*`) that Python source imports, at the top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {name for name in names if name.partition(".")[0].startswith("test_")}


def test_no_test_module_imports_another():
    """Builders that several test modules use live in helper modules (helpers, store_helpers, results_helpers,
    slurm_support), so that each test module can change without breaking another and no module's fixtures leak
    into another's."""
    tests = sorted((ROOT / "tests").glob("*.py"))
    assert len(tests) > 30
    found = {path.name: sorted(imported) for path in tests if (imported := _imported_test_modules(path.read_text()))}
    assert found == {}


def test_the_checker_finds_imports_of_test_modules():
    source = "from test_results import A\nimport helpers\n\ndef f():\n    import test_bundles.x\n"
    assert _imported_test_modules(source) == {"test_results", "test_bundles.x"}
    assert _imported_test_modules("from results_helpers import A\nimport pytest\n") == set()
