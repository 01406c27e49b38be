"""medseg-peft: adapt SAM and ViT to medical segmentation by fine-tuning a selected few of their own weights.

    model = medseg_peft.FPS(k=1)(model, batches)   # select + attach; only the deltas train
    ... train ...
    medseg_peft.save_delta(model, "delta.safetensors")
    medseg_peft.merge(model)                        # plain network for inference

Importing the package, the selectors and the tuning API loads torch but no MONAI, ignite or nibabel:
a notebook that only selects and tunes should not pay seconds of start-up for a training runtime it
does not use. The MONAI parts (``medseg_peft.data``, ``medseg_peft.workflows``, ``medseg_peft.export``,
...) load on first use, and every name stays where it was (``medseg_peft.data.polyp_transforms``,
``mp.workflows.train``) through :func:`_lazy_package`.
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"


class _LazyPackage(types.ModuleType):
    """A package whose exports load on first use (PEP 562 ``__getattr__``) and stay what they were.

    The import system binds a loaded submodule on its package (``package.polyp_transforms = <module>``),
    which would hide an exported function of the same name once anything imports that submodule; the
    eager ``from .polyp_transforms import polyp_transforms`` this replaces rebound the function, so here
    the function wins too."""

    def __setattr__(self, name, value):
        exports = self.__dict__.get("_lazy_exports", {})
        if isinstance(value, types.ModuleType) and exports.get(name) == name and value.__name__ == f"{self.__name__}.{name}":
            value = getattr(value, name)
        super().__setattr__(name, value)


def _lazy_package(name: str, exports: dict[str, str], submodules: tuple[str, ...] = ()) -> None:
    """Make package ``name`` import ``exports`` (public name -> its submodule) on first access, and
    ``submodules`` (``mp.data``, ``mp.workflows``) too, so ``package.<name>`` works as if eagerly imported."""
    package = sys.modules[name]

    def __getattr__(attr: str):
        if attr in submodules:
            return importlib.import_module(f"{name}.{attr}")
        if attr not in exports:
            raise AttributeError(f"module {name!r} has no attribute {attr!r}")
        value = getattr(importlib.import_module(f"{name}.{exports[attr]}"), attr)
        setattr(package, attr, value)  # resolved once; later look-ups are plain attributes
        return value

    def __dir__():
        return sorted(set(package.__dict__) | set(exports) | set(submodules))

    package._lazy_exports = dict(exports)
    package.__getattr__ = __getattr__
    package.__dir__ = __dir__
    package.__class__ = _LazyPackage


from medseg_peft.selection import FPS, GPS, Decoder, METHODS, SPT, LoRA, Partial, PRESETS, Entries, Full, Selection, Selector, selector  # noqa: E402
from medseg_peft.tuning import attach, cast_base, detach, load_delta, merge, save_delta, soup, trainable_parameters, unmerge  # noqa: E402

# MONAI-facing parts, imported when first touched: mp.data, mp.workflows, mp.export, ...
_lazy_package(__name__, {}, submodules=("data", "distributed", "export", "io", "models", "recipes", "results", "selection", "tuning", "workflows"))


def activation_checkpointing(model, enabled: bool = True):
    """Checkpoint the transformer blocks of ``model`` (SAM's image encoder, timm ViTs) in training; see
    ``medseg_peft.models.checkpointing`` (imported on use: it needs segment-anything's model code)."""
    from medseg_peft.models.checkpointing import activation_checkpointing as apply

    return apply(model, enabled)


__all__ = [
    "Decoder",
    "FPS",
    "activation_checkpointing",
    "GPS",
    "LoRA",
    "Full",
    "METHODS",
    "PRESETS",
    "Partial",
    "SPT",
    "Entries",
    "Selection",
    "Selector",
    "attach",
    "cast_base",
    "detach",
    "load_delta",
    "merge",
    "save_delta",
    "selector",
    "soup",
    "trainable_parameters",
    "unmerge",
]
