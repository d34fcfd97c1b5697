"""nemo_lpo.data's own import graph: one way (no cycles), imports at module top except in the CLI command module."""

import ast
import subprocess
import sys
from pathlib import Path

import nemo_lpo.data

DATA = Path(nemo_lpo.data.__file__).parent
CLI_MODULES = {"cli"}  # command modules: imported by `nemo-lpo --help`, so their work is imported inside commands


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module top?) for every import of ``path``, function-level ones included."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names]  # `from nemo_lpo.data import layout`
            out += [(name, id(node) in top) for name in [node.module, *names]]
    return out


def _graph() -> dict[str, set[str]]:
    modules = {p.stem for p in DATA.glob("*.py") if p.stem != "__init__"}
    return {m: {name.rsplit(".", 1)[-1] for name, _ in _imports(DATA / f"{m}.py")
                if name.startswith("nemo_lpo.data.") and name.rsplit(".", 1)[-1] in modules} - {m}
            for m in modules}


def test_no_import_cycle_inside_the_data_package():
    graph = _graph()
    assert "chunk_worker" in graph["pack"] and "readers" in graph["chunk_worker"]  # edges are seen
    state, cycles = {}, []

    def visit(module, path):
        state[module] = "open"
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                cycles.append([*path[path.index(dep):], dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_imports_at_module_top_except_in_the_command_module():
    late = {(p.stem, name) for p in DATA.glob("*.py") if p.stem not in CLI_MODULES
            for name, at_top in _imports(p) if not at_top and name != "__future__"}
    assert late == set()


def test_the_command_module_stays_cheap_to_import():
    code = ("import sys, nemo_lpo.data.cli; "
            "print(sorted(m for m in ('torch', 'megatron', 'transformers', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
