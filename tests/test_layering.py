"""Layering (DESIGN.md §1): a module imports only from layers before it, at module level, without circles.

Every module in ``dipuq/`` is parsed with ``ast`` (nothing is imported). Layers, in order:

    foundation -> data -> operators -> dip -> posterior -> samplers -> maps -> show -> run
    -> experiments -> commands

The foundation is the top-level modules every layer may use (``errors``, ``_io``, ``seeds``,
``geometry`` — data and operators both need it —, ``devices``, ``threads``, ``memory``,
``testing`` and the package ``__init__``); ``cli`` and ``__main__`` belong to the commands layer.
Imports within one layer are allowed. An import inside a function may not reach a dipuq module:
that is how circles and upward imports were hidden, and it also hides what a module needs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dipuq"

FOUNDATION = ("errors", "_io", "seeds", "geometry", "devices", "threads", "memory", "testing", "__init__")
#: layer name -> the first component of the module path below ``dipuq`` that places a module in it
LAYERS: dict[str, tuple[str, ...]] = {
    "foundation": FOUNDATION,
    "data": ("data",),
    "operators": ("operators",),
    "dip": ("dip",),
    "posterior": ("posterior",),
    "samplers": ("samplers",),
    "maps": ("maps",),
    "show": ("show",),
    "run": ("run",),
    "experiments": ("experiments",),
    "commands": ("commands", "cli", "__main__"),
}
_RANK = {first: (i, layer) for i, (layer, firsts) in enumerate(LAYERS.items()) for first in firsts}


def _modules() -> dict[str, Path]:
    """Dotted name -> file of every module in the package (``dipuq.data`` is ``data/__init__.py``)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("dipuq", *path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 2:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _layer(name: str) -> tuple[int, str] | None:
    """(rank, layer) of a dotted dipuq module name, None for a module no layer claims."""
    parts = name.split(".")
    return _RANK.get(parts[1] if len(parts) > 1 else "__init__")


def _package(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rsplit(".", 1)[0]


def _targets(node: ast.AST, name: str, path: Path) -> list[str]:
    """The dipuq modules an import statement (or ``importlib.import_module("dipuq...")``) reaches."""
    if isinstance(node, ast.Import):
        found = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            pkg = _package(name, path).split(".")
            pkg = pkg[: len(pkg) - (node.level - 1)]
            base = ".".join(pkg + ([base] if base else []))
        # `from dipuq import threads` reaches the module dipuq.threads; `from dipuq import __version__` dipuq
        found = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
          and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        found = [node.args[0].value]
    else:
        return []
    return sorted({t for t in found if t == "dipuq" or t.startswith("dipuq.")})


def _imports(name: str, path: Path) -> list[tuple[int, str, bool]]:
    """``(line, target module, inside a function)`` for every dipuq import of a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for t in _targets(node, name, path):
            out.append((node.lineno, t, in_function))
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    return out


IMPORTS = {name: _imports(name, path) for name, path in MODULES.items()}


def _where(name: str, line: int) -> str:
    return f"{MODULES[name].relative_to(PACKAGE.parent)}:{line}"


def test_every_module_has_a_layer():
    unplaced = sorted(n for n in MODULES if _layer(n) is None)
    assert not unplaced, f"modules in no layer (add them to LAYERS in {Path(__file__).name}): {unplaced}"


def test_imports_only_from_layers_before():
    bad = []
    for name, imports in IMPORTS.items():
        own = _layer(name)
        for line, target, _ in imports:
            theirs = _layer(target)
            if own is not None and theirs is not None and theirs[0] > own[0]:
                bad.append(f"{_where(name, line)} ({own[1]}) imports {target} ({theirs[1]})")
    assert not bad, "imports from a later layer:\n" + "\n".join(bad)


#: The one exception: a command's ``main`` imports the pipeline or the experiments driver when it
#: runs, so that ``dipuq --help`` and ``dipuq X --help`` do not load matplotlib, scipy and astra
#: (measured 3.7 s instead of 2.1 s). It dodges no circle: test_no_import_circles counts it.
LAZY_FOR_STARTUP = {("dipuq.commands.reconstruct", "dipuq.run.pipeline"), ("dipuq.commands.demo", "dipuq.run.pipeline"),
                    ("dipuq.commands.experiment", "dipuq.experiments"), ("dipuq.commands.show", "dipuq.show.viz")}


def test_no_function_level_imports_of_dipuq_modules():
    bad = [f"{_where(name, line)} imports {target} inside a function"
           for name, imports in IMPORTS.items() for line, target, in_function in imports
           if in_function and (name, target) not in LAZY_FOR_STARTUP]
    assert not bad, "function-level imports of dipuq modules (import at the top):\n" + "\n".join(bad)


def test_no_import_circles():
    """The module graph (every import, module or function level) has no cycle."""
    graph = {name: sorted({t for _, t, _ in imports if t in MODULES and t != name})
             for name, imports in IMPORTS.items()}
    state: dict[str, int] = {}  # 1: on the current depth-first path, 2: done
    cycles: list[list[str]] = []

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt, path + [nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            walk(name, [name])
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("name, target, expected", [
    ("dipuq.data.scan", "dipuq.operators.ray", True),
    ("dipuq.geometry", "dipuq.data.scan", True),
    ("dipuq.operators.ray", "dipuq.data.scan", False),
    ("dipuq.cli", "dipuq.experiments", False),
])
def test_layer_order_as_documented(name, target, expected):
    """The checker itself: an import from a later layer is flagged, one from an earlier layer is not."""
    assert (_layer(target)[0] > _layer(name)[0]) is expected
