"""Old module paths, kept importable: ``hkd.verify`` is :mod:`hkd.sampling.verify` since 0.2.

Plugins written against 0.1 import modules such as ``hkd.verify`` or ``hkd.stage``; the tree
now groups modules by role. One finder maps every old name to the module that replaced it, so
``import hkd.verify`` returns the very module object ``hkd.sampling.verify`` (monkeypatching
either name patches both) and warns once with the new path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType
from typing import Any, Callable

# old name -> new name; names that did not move (hkd.config, hkd.errors, hkd.kernels, hkd.plugins.*) are
# absent, and so are the three old modules whose name is now a package's (FORWARDED below)
MOVED: dict[str, str] = {
    "hkd.architectures": "hkd.models.architectures",
    "hkd.augment": "hkd.sampling.augment",
    "hkd.cache": "hkd.teachers.cache",
    "hkd.checkpoint": "hkd.train.checkpoint",
    "hkd.distributed": "hkd.train.distributed",
    "hkd.divergence": "hkd.kernels.divergence",
    "hkd.evaluate": "hkd.commands.evaluate",
    "hkd.export": "hkd.models.export",
    "hkd.generate": "hkd.commands.generate",
    "hkd.generation": "hkd.sampling.backends",
    "hkd.hfdata": "hkd.data.hf",
    "hkd.hookspecs": "hkd.plugin.hookspecs",
    "hkd.init_config": "hkd.commands.init_config",
    "hkd.init_student": "hkd.commands.init_student",
    "hkd.layermap": "hkd.models.layermap",
    "hkd.loop": "hkd.train.loop",
    "hkd.manager": "hkd.plugin.manager",
    "hkd.probe": "hkd.commands.probe",
    "hkd.report": "hkd.commands.report",
    "hkd.rundir": "hkd.train.rundir",
    "hkd.schedule": "hkd.plugin.schedule",
    "hkd.seeding": "hkd.train.seeding",
    "hkd.sources": "hkd.teachers.sources",
    "hkd.stage": "hkd.plugin.stage",
    "hkd.taps": "hkd.models.taps",
    "hkd.tasks.demo": "hkd.commands.demo",
    "hkd.tokenalign": "hkd.data.tokenalign",
    "hkd.validation": "hkd.train.validation",
    "hkd.verify": "hkd.sampling.verify",
    "hkd.view": "hkd.models.view",
}


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(self.target)

    def exec_module(self, module: ModuleType) -> None:
        pass  # the target module ran when it was imported


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Resolves an old module name to its new module, with a ``DeprecationWarning``."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        new = MOVED.get(fullname)
        if new is None:
            return None
        warnings.warn(f"{fullname} moved to {new}; import it from there (the old path goes in hkd 0.3)",
                      DeprecationWarning, stacklevel=2)
        return importlib.machinery.ModuleSpec(fullname, _Alias(new))


# old module -> the module its names now live in, where the old name is now a package: `from hkd.models
# import load_model` reaches hkd.models.loading through the package's __getattr__ (forward_names)
FORWARDED: dict[str, str] = {
    "hkd.data": "hkd.data.encoding",
    "hkd.models": "hkd.models.loading",
    "hkd.sampling": "hkd.sampling.hf_sampler",
}


def forward_names(package: str) -> Callable[[str], Any]:
    """A package ``__getattr__`` that serves the names of the module the package replaced."""
    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        target = FORWARDED[package]
        module = importlib.import_module(target)
        if not hasattr(module, name):
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        warnings.warn(f"{package}.{name} moved to {target}.{name}; import it from there (the old path goes in "
                      "hkd 0.3)", DeprecationWarning, stacklevel=2)
        return getattr(module, name)
    return __getattr__


def install() -> None:
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())
