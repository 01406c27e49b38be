"""Methods by name (``mp.selector("gps", k=1)``), for code that picks a method from a string.

``METHODS`` fills itself: every ``Selector`` subclass that names its ``method`` registers on import
(``selection.base``). Settings are passed to the method's constructor as they are, so a setting the
method does not take is an error naming the settings it does take, never silently dropped.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

from medseg_peft.selection.base import METHODS, Selector

# the package's folder and name, read off this file: importing the package here would make it import itself
_PACKAGE_DIR, _PACKAGE = Path(__file__).parent, __name__.rpartition(".")[0]


def _import_methods() -> None:
    """Import every module of this package, so each method in it registers (a new method is a new file)."""
    for info in pkgutil.iter_modules([str(_PACKAGE_DIR)]):
        importlib.import_module(f"{_PACKAGE}.{info.name}")


def settings_of(cls: type[Selector]) -> list[str]:
    """The keyword settings ``cls(...)`` takes."""
    params = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in params if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def method_class(method: str) -> type[Selector]:
    """The ``Selector`` class named ``method`` (any case); an unknown name is an error listing the known ones."""
    key = str(method).lower()
    if key not in METHODS:
        _import_methods()
    if key not in METHODS:
        raise ValueError(f"unknown method {method!r}; known methods: {sorted(METHODS)}")
    return METHODS[key]


def selector(method: str, **settings) -> Selector:
    """The selector named ``method`` built from ``settings``; unknown methods and settings are errors."""
    cls = method_class(method)
    key = cls.method
    unknown = sorted(set(settings) - set(settings_of(cls)))
    if unknown:
        raise TypeError(f"{cls.__name__} ({key!r}) takes no setting(s) {unknown}; its settings are {settings_of(cls)}")
    return cls(**settings)


__all__ = ["METHODS", "method_class", "selector", "settings_of"]
