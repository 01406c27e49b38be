"""Packages whose names load on first use: the light import of ``medseg_peft`` rests on this.

``medseg_peft``, ``medseg_peft.data`` and ``medseg_peft.workflows`` map each public name to the module
that defines it, and import that module only when the name is first read, so selecting and tuning in a
notebook never loads MONAI. It imports nothing of the package, so every layer may use it.
"""

from __future__ import annotations

import importlib
import sys
import types


class LazyPackage(types.ModuleType):
    """A package whose exports load on first use (PEP 562 ``__getattr__``) and stay what they were.

    The import system binds a loaded submodule on its package (``package.polyp_transforms = <module>``),
    which would hide an exported function of the same name once anything imports that submodule; an eager
    ``from .polyp_transforms import polyp_transforms`` would rebind the function, so here the function wins too."""

    def __setattr__(self, name, value):
        exports = self.__dict__.get("_lazy_exports", {})
        if isinstance(value, types.ModuleType) and exports.get(name) == name and value.__name__ == f"{self.__name__}.{name}":
            value = getattr(value, name)
        super().__setattr__(name, value)


def lazy_package(name: str, exports: dict[str, str], submodules: tuple[str, ...] = ()) -> None:
    """Make package ``name`` import ``exports`` (public name -> its submodule, or a module's full dotted name) on first access, and
    ``submodules`` (``mp.data``, ``mp.workflows``) too, so ``package.<name>`` works as if eagerly imported."""
    package = sys.modules[name]

    def __getattr__(attr: str):
        if attr in submodules:
            return importlib.import_module(f"{name}.{attr}")
        if attr not in exports:
            raise AttributeError(f"module {name!r} has no attribute {attr!r}")
        module = exports[attr] if exports[attr].startswith("medseg_peft.") else f"{name}.{exports[attr]}"
        value = getattr(importlib.import_module(module), attr)
        setattr(package, attr, value)  # resolved once; later look-ups are plain attributes
        return value

    def __dir__():
        return sorted(set(package.__dict__) | set(exports) | set(submodules))

    package._lazy_exports = dict(exports)
    package.__getattr__ = __getattr__
    package.__dir__ = __dir__
    package.__class__ = LazyPackage


__all__ = ["LazyPackage", "lazy_package"]
