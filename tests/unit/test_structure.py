"""Structure of the package: no import cycles, every mode registered and runnable by name."""

from __future__ import annotations

import ast
from pathlib import Path

import kdlib
from kdlib.config import Mode

SRC = Path(kdlib.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """kdlib modules imported anywhere in the file except under ``if TYPE_CHECKING``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
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
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                full = f"{base}.{alias.name}"
                found.add(full if full in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m in modules and m != name}


def test_no_import_cycles_in_the_package():
    files = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph = {name: _imports(path, name, set(files)) for name, path in files.items()}
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_a_cycle(tmp_path, monkeypatch):
    """The check above can fail: a two-module cycle in a scratch package is reported."""
    pkg = tmp_path / "kdlib"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from kdlib import b\n")
    (pkg / "b.py").write_text("def f():\n    from kdlib.a import x\n")
    monkeypatch.setattr(__import__(__name__), "SRC", pkg)
    import pytest

    with pytest.raises(AssertionError, match="kdlib.a -> kdlib.b -> kdlib.a"):
        test_no_import_cycles_in_the_package()


def test_every_mode_has_one_registered_class():
    from kdlib.controller import MODES
    from kdlib.controller.mode import RunMode

    assert sorted(MODES.names()) == sorted(m.value for m in Mode)
    for mode in Mode:
        assert issubclass(MODES.get(mode.value), RunMode), mode


def _architecture_tool():
    import importlib.util

    path = SRC.parents[1] / "scripts" / "check_architecture.py"
    spec = importlib.util.spec_from_file_location("check_architecture", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_module_is_over_400_lines():
    assert _architecture_tool().long_modules() == []


def test_only_the_sglang_backend_names_sglang():
    tool = _architecture_tool()
    assert tool.modules_naming_sglang() == []
    # the check can fail: the backend's own modules do name it
    assert any("sglang" in p.read_text().lower() for p in (SRC / "backends" / "sglang").glob("*.py"))
