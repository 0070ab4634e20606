"""Lazy registration: importing an interface (`ptqbench.tasks.base`, `ptqbench.methods.base`) or the
registry imports no torch, no segment_anything and no concrete task or method; the registries still
give every built-in."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from ptqbench.registry import BUILTINS


def _heavy_modules_after(imports: str, also_heavy: str) -> str:
    """What a fresh interpreter has loaded after `import <imports>`: the torch and
    segment_anything modules, and those the expression `also_heavy` (over a module name `m`)
    flags, printed as a sorted list."""
    code = (f"import {imports}; import sys; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {{'torch','segment_anything'}} "
            f"or {also_heavy}))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_importing_the_task_interface_and_the_registry_imports_nothing_heavy():
    assert _heavy_modules_after("ptqbench.tasks.base, ptqbench.registry", "m.startswith('ptqbench.tasks.coco')") == "[]"


def test_importing_the_method_interface_imports_nothing_heavy():
    also_heavy = "m.startswith(('ptqbench.methods.', 'ptqbench.tasks.')) and m != 'ptqbench.methods.base'"
    assert _heavy_modules_after("ptqbench.methods.base", also_heavy) == "[]"


def test_get_imports_the_module_that_registers_a_builtin():
    from ptqbench.methods.base import METHODS
    from ptqbench.methods.saqsam.method import SaqSam
    from ptqbench.tasks.base import TASKS
    from ptqbench.tasks.coco import CocoTask

    assert TASKS.get("coco") is CocoTask
    assert METHODS.get("saqsam") is SaqSam and METHODS.get("saq-sam") is SaqSam


@pytest.mark.parametrize("kind,registry", [("method", "ptqbench.methods.base:METHODS"),
                                           ("task", "ptqbench.tasks.base:TASKS"),
                                           ("model", "ptqbench.models.spec:MODELS")])
def test_every_builtin_is_registered_by_the_module_the_table_names(kind, registry):
    module, attribute = registry.split(":")
    reg = getattr(importlib.import_module(module), attribute)
    for name, entry in BUILTINS[kind].items():
        factory = reg.get(name)
        assert factory.__module__ == entry.module
        assert all(reg.get(alias) is factory for alias in entry.aliases)
    assert sorted(reg._factories) == sorted(BUILTINS[kind]) == reg.names()
