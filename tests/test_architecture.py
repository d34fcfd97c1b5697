"""The package's import graph: subpackages depend one way, and no module imports itself back through others.

Read from the source with ``ast`` (function-level imports included, so a lazy import cannot hide a cycle; and a
module named in a string, ``"nemo_lpo.data.pack"`` as given to ``importlib.import_module`` by ``data/__init__.py``'s
lazy exports and the CLI's command table, counts as imported where the string is). The layers, lowest first
(docs/architecture.md):

    io, killpoint, losses, quiet -> metrics, config -> data -> model -> batch -> train -> convert | evaluate -> bridge -> demo -> cli

A module may import from its own subpackage and from lower layers only; ``convert`` and ``evaluate`` are peers
and import neither each other.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nemo_lpo"
LAYERS = {"io": 0, "killpoint": 0, "losses": 0, "quiet": 0, "metrics": 1, "config": 1, "data": 2, "model": 3, "batch": 4, "train": 5, "convert": 6,
          "evaluate": 6, "bridge": 7, "onpolicy": 7, "demo": 8, "cli": 9, "__init__": 9}


MODULE_NAME = re.compile(r"nemo_lpo(\.[A-Za-z_]\w*)+")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: frozenset[str] = frozenset()) -> set[str]:
    """The nemo_lpo modules ``path`` imports anywhere in its body (``from a.b import c`` counts a.b and a.b.c).

    A string that is exactly a dotted ``nemo_lpo...`` name (loaded by name: ``importlib.import_module``) counts too.
    ``from a.b import c`` of SUBMODULES only (each a.b.c in ``modules``) counts them and not the package a.b: Python
    has run a.b's ``__init__`` before any of its submodules, so that edge would close a cycle with every package
    whose ``__init__`` names its submodules.
    """
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_NAME.fullmatch(node.value):
            found.add(node.value)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            named = {f"{node.module}.{alias.name}" for alias in node.names}
            found.update(named if named <= modules else {node.module, *named})
    return {name for name in found if name == "nemo_lpo" or name.startswith("nemo_lpo.")}


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    names = frozenset(modules)
    return {name: {dep for dep in _imports(path, names) if dep in modules and dep != name}
            for name, path in modules.items()}


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


def _cycles(graph: dict[str, set[str]]) -> list[str]:
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
    return cycles


def test_no_module_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_a_cycle_through_a_module_named_in_a_string_is_seen():
    """Planted: data.pack loading the CLI by name (as data/__init__.py loads its exports) closes a cycle."""
    graph = _graph()
    assert "nemo_lpo.data.pack" in graph["nemo_lpo.data"]  # the lazy export, seen through its string
    assert "nemo_lpo.data.cli" in graph["nemo_lpo.cli"]  # the command table's string
    graph["nemo_lpo.data.pack"] = graph["nemo_lpo.data.pack"] | {"nemo_lpo.cli"}
    assert any(cycle.startswith("nemo_lpo.cli -> ") or "-> nemo_lpo.cli ->" in cycle for cycle in _cycles(graph))


def test_the_checker_sees_a_cycle(tmp_path):
    """The ast reader finds function-level imports (the kind that used to hide the graph)."""
    path = tmp_path / "mod.py"
    path.write_text("import importlib\ndef f():\n    from nemo_lpo.train.loop import Trainer\n    import nemo_lpo.data.pack\n"
                    "    return importlib.import_module('nemo_lpo.convert.cli')  # see nemo_lpo.io for why\n")
    assert _imports(path) == {"nemo_lpo.train.loop", "nemo_lpo.train.loop.Trainer", "nemo_lpo.data.pack",
                              "nemo_lpo.convert.cli"}  # a string only when it is exactly a module name


# Modules that may import inside functions, and why (every other module imports at its top). Command modules stay
# cheap to import because ``nemo-lpo --help`` imports all of them; the others import an optional dependency.
LAZY_IMPORTS = {
    "nemo_lpo.cli": "the entry point: imports the command modules and nothing heavy",
    "nemo_lpo.data.cli": "command module", "nemo_lpo.train.cli": "command module",
    "nemo_lpo.convert.cli": "command module", "nemo_lpo.evaluate.cli": "command module",
    "nemo_lpo.demo.cli": "command module", "nemo_lpo.bridge.cli": "command module",
    "nemo_lpo.onpolicy.cli": "command module",
    "nemo_lpo.onpolicy.engines": "vLLM is an optional GPU-only engine (imported only when --backend vllm)",
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
