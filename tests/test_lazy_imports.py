"""Lazy registration: importing an interface (`ptqbench.tasks.base`, `ptqbench.methods.base`) or the
registry imports no torch, no segment_anything and no concrete task or method; the registries still
give every built-in."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from ptqbench.registry import BUILTINS


def test_importing_the_task_interface_and_the_registry_imports_nothing_heavy():
    code = ("import ptqbench.tasks.base, ptqbench.registry; import sys; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in {'torch','segment_anything'} "
            "or m.startswith('ptqbench.tasks.coco')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_importing_the_method_interface_imports_nothing_heavy():
    code = ("import ptqbench.methods.base; import sys; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in {'torch','segment_anything'} "
            "or m.startswith(('ptqbench.methods.', 'ptqbench.tasks.')) and m != 'ptqbench.methods.base'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_get_imports_the_module_that_registers_a_builtin():
    from ptqbench.methods.base import METHODS
    from ptqbench.methods.saqsam import SaqSam
    from ptqbench.tasks.base import TASKS
    from ptqbench.tasks.coco import make_coco_task

    assert TASKS.get("coco") is make_coco_task
    assert METHODS.get("saqsam") is SaqSam and METHODS.get("saq-sam") is SaqSam


@pytest.mark.parametrize("kind,registry", [("method", "ptqbench.methods.base:METHODS"),
                                           ("task", "ptqbench.tasks.base:TASKS"),
                                           ("model", "ptqbench.sam.models:MODELS")])
def test_every_builtin_is_registered_by_the_module_the_table_names(kind, registry):
    module, attribute = registry.split(":")
    reg = getattr(importlib.import_module(module), attribute)
    for name, entry in BUILTINS[kind].items():
        factory = reg.get(name)
        assert factory.__module__ == entry.module
        assert all(reg.get(alias) is factory for alias in entry.aliases)
    assert sorted(reg._factories) == sorted(BUILTINS[kind]) == reg.names()
