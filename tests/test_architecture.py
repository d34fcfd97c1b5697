"""The package's import graph: subpackages depend one way, and no module imports itself back through others.

Read from the source with ``ast`` (function-level imports included, so a lazy import cannot hide a cycle). The
layers, lowest first (docs/architecture.md):

    io, killpoint, losses, quiet -> metrics, config -> data -> model -> batch -> train -> convert | evaluate -> bridge -> demo -> cli

A module may import from its own subpackage and from lower layers only; ``convert`` and ``evaluate`` are peers
and import neither each other.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nemo_lpo"
LAYERS = {"io": 0, "killpoint": 0, "losses": 0, "quiet": 0, "metrics": 1, "config": 1, "data": 2, "model": 3, "batch": 4, "train": 5, "convert": 6,
          "evaluate": 6, "bridge": 7, "demo": 8, "cli": 9, "__init__": 9}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The nemo_lpo modules ``path`` imports anywhere in its body (``from a.b import c`` counts a.b and a.b.c)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "nemo_lpo" or name.startswith("nemo_lpo.")}


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: {dep for dep in _imports(path) if dep in modules and dep != name} for name, path in modules.items()}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_subpackage_has_a_layer():
    assert {_layer(name) for name in _graph()} <= LAYERS.keys()


def test_subpackages_depend_one_way():
    wrong = []
    for module, deps in _graph().items():
        for dep in deps:
            src, dst = _layer(module), _layer(dep)
            if src != dst and LAYERS[dst] >= LAYERS[src] and dst != "__init__":
                wrong.append(f"{module} -> {dep}")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_no_module_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [node, dep]) if dep in stack else f"{node} -> {dep}")
            elif dep not in state:
                visit(dep, [*stack, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_a_cycle(tmp_path):
    """The ast reader finds function-level imports (the kind that used to hide the graph)."""
    path = tmp_path / "mod.py"
    path.write_text("def f():\n    from nemo_lpo.train.loop import Trainer\n    import nemo_lpo.data.pack\n")
    assert _imports(path) >= {"nemo_lpo.train.loop", "nemo_lpo.data.pack"}


# Modules that may import inside functions, and why (every other module imports at its top). Command modules stay
# cheap to import because ``nemo-lpo --help`` imports all of them; the others import an optional dependency.
LAZY_IMPORTS = {
    "nemo_lpo.cli": "the entry point: imports the command modules and nothing heavy",
    "nemo_lpo.data.cli": "command module", "nemo_lpo.train.cli": "command module",
    "nemo_lpo.convert.cli": "command module", "nemo_lpo.evaluate.cli": "command module",
    "nemo_lpo.demo.cli": "command module", "nemo_lpo.bridge.cli": "command module",
    "nemo_lpo.bridge": "probes whether the optional Megatron-Bridge imports",
    "nemo_lpo.model.build": "imports Transformer Engine only to probe it or to build its spec (a broken TE raises "
                            "RuntimeError; model.transformer_impl=local must not touch it)",
    "nemo_lpo.model.te_attention": "Transformer Engine is optional (absent on CPU machines)",
    "nemo_lpo.train.metrics": "TensorBoard and Weights & Biases are optional loggers",
    "nemo_lpo.demo.plots": "matplotlib's Agg backend must be chosen before pyplot is imported",
    "nemo_lpo.config.loss_options": "the loss registry imports torch: only when a loss is validated, not at `--help`",
    "nemo_lpo.train.adapters": "Megatron-Bridge's PEFT is optional (it imports Transformer Engine): only under peft",
    "nemo_lpo.convert.adapters": "peft (Hugging Face) is optional: only for `mcore-to-hf --adapters-out`",
}


def _function_level_imports(path: Path) -> int:
    tree = ast.parse(path.read_text(), str(path))
    top = {id(node) for node in tree.body}
    return sum(isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in top for node in ast.walk(tree))


def test_imports_at_module_top_except_where_listed():
    lazy = sorted(_module_name(path) for path in PACKAGE.rglob("*.py") if _function_level_imports(path))
    assert [name for name in lazy if name not in LAZY_IMPORTS] == []


def test_the_command_line_starts_without_torch():
    """``nemo-lpo --help`` builds every command's parser without importing torch or megatron."""
    code = ("import sys, nemo_lpo.cli; nemo_lpo.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'megatron', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
