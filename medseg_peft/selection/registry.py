"""Methods by name, so a bundle swaps the method with one string key (``--method gps``).

Every method takes the settings it understands from one shared pool (``k``, ``loss``, ``seed``, ...);
the rest are ignored, so the same bundle keys serve every method. Adding a method is one new module
plus one line here.
"""

from __future__ import annotations

import inspect

from medseg_peft.selection.base import Selector
from medseg_peft.selection.fps import FPS
from medseg_peft.selection.full import Full
from medseg_peft.selection.gps import GPS
from medseg_peft.selection.lora import LoRA
from medseg_peft.selection.partial import Partial
from medseg_peft.selection.spt import SPT

METHODS: dict[str, type[Selector]] = {"fps": FPS, "gps": GPS, "full": Full, "lora": LoRA, "spt": SPT, "partial": Partial}


def _accepted(cls: type) -> set[str]:
    """Keyword names ``cls(...)`` takes: its own, and its bases' as far as ``**kwargs`` passes them on."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names |= {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return names - {"self"}


def selector(method: str, **settings) -> Selector:
    """The selector named ``method``, built from the ``settings`` it accepts."""
    key = str(method).lower()
    if key not in METHODS:
        raise ValueError(f"unknown method {method!r}; known methods: {sorted(METHODS)}")
    cls = METHODS[key]
    accepted = _accepted(cls)
    return cls(**{k: v for k, v in settings.items() if k in accepted})
