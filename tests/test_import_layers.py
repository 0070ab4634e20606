"""Import layering of ptqbench, checked statically (the source is parsed with `ast`, never imported).

The graph has one node per subpackage (``ptqbench.quant``, ``ptqbench.models.sam1``, ``ptqbench.methods``,
``ptqbench.tasks``, ``ptqbench.demo``) or top-level module (``ptqbench.harness``,
``ptqbench.config``, ...). An edge A -> B is a module-level import in A of anything in B, resolved
for relative and absolute forms. Imports inside functions or classes are lazy and do not count;
imports under ``if TYPE_CHECKING:`` do not count either.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "ptqbench"

# Known imports of ptqbench/quant/ into method, model or task code, each a (file, imported module)
# pair; they are to be removed, never added to. Empty: quant/ holds method-agnostic primitives.
QUANT_ALLOWED_VIOLATIONS: frozenset[tuple[str, str]] = frozenset()

QUANT_FORBIDDEN = ("ptqbench.models", "ptqbench.methods", "ptqbench.tasks")  # for quant/ and recon/


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Statements run at import time: descends into if/try/with blocks, not into defs or classes."""
    for node in body:
        if isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _module_level(node.body)
            yield from _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody):
                yield from _module_level(block)
            for handler in node.handlers:
                yield from _module_level(handler.body)
        elif isinstance(node, ast.With):
            yield from _module_level(node.body)
        else:
            yield node


def _imports(path: Path) -> Iterator[tuple[str, int]]:
    """(imported module, line) for each module-level import in `path`."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    yield from _imports_of(path.read_text(encoding="utf-8"), package, str(path))


def _imports_of(source: str, package: str, filename: str) -> Iterator[tuple[str, int]]:
    """(imported module, line) for each module-level import in `source`, a module of `package`."""
    tree = ast.parse(source, filename=filename)
    for node in _module_level(tree.body):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                # `from ptqbench.tasks import coco` imports the submodule ptqbench.tasks.coco.
                candidate = f"{base}.{alias.name}"
                yield (candidate if _exists(candidate) else base), node.lineno


def _exists(module: str) -> bool:
    relative = Path(*module.split(".")[1:]) if "." in module else Path()
    target = PACKAGE_DIR / relative
    return target.with_suffix(".py").is_file() or (target / "__init__.py").is_file()


def _node(module: str) -> str:
    """The graph node of a ptqbench module: its subpackage or top-level module; under
    `ptqbench.models`, each family package (`ptqbench.models.sam1`) is a node of its own."""
    parts = module.split(".")
    if parts[1:2] == ["models"] and len(parts) > 2 and (PACKAGE_DIR / "models" / parts[2]).is_dir():
        return ".".join(parts[:3])
    return ".".join(parts[:2])


def _edges() -> dict[tuple[str, str], list[str]]:
    """(source node, target node) -> ["file:line imports module", ...] across subpackages."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        source = _node(_module_name(path))
        for imported, line in _imports(path):
            if imported != "ptqbench" and not imported.startswith("ptqbench."):
                continue
            target = _node(imported)
            if target in (source, "ptqbench"):
                continue
            where = f"{path.relative_to(PACKAGE_DIR.parent)}:{line} imports {imported}"
            found = edges.setdefault((source, target), [])
            if where not in found:
                found.append(where)
    return edges


def _find_cycle(edges: dict[tuple[str, str], list[str]]) -> list[str] | None:
    graph: dict[str, list[str]] = {}
    for source, target in edges:
        graph.setdefault(source, []).append(target)
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, [])):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_graph_sees_known_edges() -> None:
    """The parser itself: a few imports that must be found (guards against a vacuous pass)."""
    edges = _edges()
    assert ("ptqbench.methods", "ptqbench.quant") in edges
    assert ("ptqbench.harness", "ptqbench.tasks") in edges
    assert ("ptqbench.models.sam1", "ptqbench.quant") in edges


def test_lazy_and_type_checking_imports_do_not_count() -> None:
    """Imports inside functions and under `if TYPE_CHECKING:` are not edges; relative ones resolve."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "from .layers import QuantLinear\n"
        "from ..errors import DataError\n"
        "from ptqbench.tasks import coco\n"
        "if TYPE_CHECKING:\n"
        "    from ptqbench.models.sam1.inference import BoxPredictor\n"
        "def lazy():\n"
        "    from ptqbench.tasks import base\n"
    )
    imported = [name for name, _line in _imports_of(source, "ptqbench.quant", "probe.py")]
    assert imported == ["typing", "ptqbench.quant.layers", "ptqbench.errors", "ptqbench.tasks.coco"]


def test_no_import_cycle_between_subpackages() -> None:
    edges = _edges()
    cycle = _find_cycle(edges)
    if cycle is None:
        return
    lines = []
    for source, target in zip(cycle, cycle[1:], strict=False):
        lines.append(f"{source} -> {target}:")
        lines.extend(f"    {where}" for where in edges[(source, target)])
    raise AssertionError("import cycle between ptqbench subpackages:\n" + "\n".join(lines))


def test_quant_imports_no_method_model_or_task_code() -> None:
    found = set()
    for path in sorted((PACKAGE_DIR / "quant").rglob("*.py")):
        for imported, _line in _imports(path):
            if imported.startswith(QUANT_FORBIDDEN):
                found.add((str(path.relative_to(PACKAGE_DIR.parent)), imported))
    new = sorted(found - QUANT_ALLOWED_VIOLATIONS)
    assert not new, f"ptqbench/quant/ must stay method-agnostic; new imports: {new}"
    stale = sorted(QUANT_ALLOWED_VIOLATIONS - found)
    assert not stale, f"remove these fixed entries from QUANT_ALLOWED_VIOLATIONS: {stale}"


def test_recon_imports_no_model_method_or_task_code() -> None:
    """The reconstruction engine is method- and model-agnostic: the model's forward is injected."""
    found = sorted((str(path.relative_to(PACKAGE_DIR.parent)), imported)
                   for path in sorted((PACKAGE_DIR / "recon").rglob("*.py"))
                   for imported, _line in _imports(path)
                   if imported.startswith(QUANT_FORBIDDEN))
    assert not found, f"ptqbench/recon/ must not import model, method or task code: {found}"


def _all_imports(source: str) -> Iterator[str]:
    """Every module an `import` statement anywhere in `source` names (lazy and TYPE_CHECKING ones too)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def test_segment_anything_is_imported_only_by_the_sam_adapter() -> None:
    """SAM-1 sits behind one boundary: only `ptqbench/models/sam1/` imports segment_anything; methods,
    tasks, the harness and the engine see `nn.Module`s and the adapter's functions."""
    outside = sorted(str(path.relative_to(PACKAGE_DIR.parent))
                     for path in PACKAGE_DIR.rglob("*.py")
                     if (PACKAGE_DIR / "models" / "sam1") not in path.parents
                     and any(name.split(".")[0] == "segment_anything"
                             for name in _all_imports(path.read_text(encoding="utf-8"))))
    assert not outside, f"segment_anything imported outside ptqbench/models/sam1/: {outside}"


def test_only_the_sam1_package_imports_itself() -> None:
    """Methods, tasks, the engine, the harness and the CLI see SAM-1 only through its adapter
    (`ptqbench.models.adapter`) and the neutral types: no file outside ptqbench/models/sam1/ imports
    `ptqbench.models.sam1` in any form (module level, lazy inside a function, under TYPE_CHECKING,
    relative, `from ptqbench.models import sam1`, or `importlib.import_module` of a literal name;
    the registries name its modules as strings, which they import on first use)."""
    forbidden = "ptqbench.models.sam1"
    found = []
    paths = sorted(path for path in PACKAGE_DIR.rglob("*.py") if (PACKAGE_DIR / "models" / "sam1") not in path.parents)
    for path in paths:
        module = _module_name(path)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - (node.level - 1)] + ([base] if base else []))
                names = [base] + [f"{base}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
                function = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if function in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                    names = [node.args[0].value]
            if any(name == forbidden or name.startswith(forbidden + ".") for name in names):
                found.append(f"{path.relative_to(PACKAGE_DIR.parent)}:{node.lineno}")
    assert any(path.parent.name == "tasks" for path in paths) and any(path.parent.name == "methods" for path in paths)
    assert not found, f"{forbidden} imported outside its package (use its adapter): {found}"
