"""Attach a Selection's deltas to a model, train them, fold them in and take them out again.

Life cycle (the same for every selection method)::

    attach(model, selection)   # base frozen and untouched, deltas trainable
    ... train: optimizer over trainable_parameters(model) ...
    merge(model)               # plain model, deltas folded into the weights, no extra modules
    unmerge(model)             # base weights back bit for bit, deltas attached again

The bookkeeping lives in one plain attribute on the model (``model.medseg_peft``), which is neither a
module, a parameter nor a hook, so a merged model's ``state_dict`` and forward are exactly those of
the plain network.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from medseg_peft.entries import ADAPTER, LORA, Entries, Selection
from medseg_peft.tuning.adapter import AdapterDelta
from medseg_peft.tuning.branch import Branch
from medseg_peft.tuning.delta import Delta, delta_linear_forward
from medseg_peft.tuning.delta_conv import delta_conv_forward, prepare_conv
from medseg_peft.tuning.lora import LoRADelta

STATE_ATTR = "medseg_peft"
BRANCH_CHILD = "peft_branch"


@dataclass
class TuningState:
    """What ``attach`` did to a model, so that it can be merged, unmerged and saved."""

    selection: Selection
    deltas: dict[str, nn.Module]  # a Delta or a Branch (LoRA, adapter), one per tuned tensor
    requires_grad: dict[str, bool]  # the flags the model had before attach
    merged: bool = False
    base_values: dict[str, torch.Tensor] = field(default_factory=dict)  # base entries while merged
    param_order: dict[str, list[str]] = field(default_factory=dict)  # per tuned module, its parameters' order


def tuning_state(model: nn.Module) -> TuningState:
    state = getattr(model, STATE_ATTR, None)
    if not isinstance(state, TuningState):
        raise ValueError(f"this {type(model).__name__} has no attached deltas: call a selector or medseg_peft.attach(model, selection) first")
    return state


def is_attached(model: nn.Module) -> bool:
    return isinstance(getattr(model, STATE_ATTR, None), TuningState)


def owner_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, tensor_name = name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), tensor_name


def _own_class(module: nn.Module) -> None:
    """Give a parametrized module a generated class of its own before parametrizations are removed.

    ``copy.deepcopy`` of a parametrized module shares the generated class between original and copy,
    and removing a parametrization deletes its property from that class, which would break the
    other copy; a private class keeps the removal local.
    """
    cls = type(module)
    namespace = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)


def _remove(model: nn.Module, state: TuningState) -> None:
    """Remove every parametrization and put each module's parameters back in their original order,
    so the plain model's ``state_dict`` keys come out exactly as the base's."""
    owners = {}
    for name, delta in state.deltas.items():
        module, tensor_name = owner_of(model, name)
        if isinstance(delta, Branch):
            for key in [k for k, h in module._forward_hooks.items() if getattr(h, "__self__", None) is delta]:
                del module._forward_hooks[key]
            delattr(module, BRANCH_CHILD)
            if delta.sparse is None:
                continue
        if id(module) not in owners and parametrize.is_parametrized(module):
            _own_class(module)
        owners[id(module)] = module
        parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=False)
    for module_name, order in state.param_order.items():
        module = model.get_submodule(module_name) if module_name else model
        module._parameters = {k: module._parameters[k] for k in order}


def make_delta(entries: Entries, device: torch.device | None = None, dropout: float = 0.0, drop_path: float = 0.0) -> nn.Module:
    """The module that trains ``entries``: sparse / whole values (a parametrization), or LoRA / adapter
    branches (forward hooks) regularised by ``dropout`` and ``drop_path`` while training."""
    branches = {LORA: LoRADelta, ADAPTER: AdapterDelta}
    if entries.layout in branches:
        return branches[entries.layout](entries, device, dropout, drop_path)
    return Delta(entries, device)


def _register(module: nn.Module, tensor_name: str, delta: nn.Module) -> None:
    """Parametrize ``module.<tensor_name>`` by ``delta``; a plain Linear's or Conv2d's weight also gets the lean forward.

    ``register_parametrization`` gives each module its own generated subclass, so setting ``forward``
    on that class changes this module only, and ``remove_parametrizations`` drops it with the class.
    """
    if isinstance(delta, Branch):
        if parametrize.type_before_parametrizations(module) is not nn.Linear or tensor_name != "weight":
            raise ValueError(f"a {delta.layout} branch attaches to an nn.Linear weight, not to {type(module).__name__}.{tensor_name}")
        module.add_module(BRANCH_CHILD, delta)
        module.register_forward_hook(delta.hook)
        if delta.sparse is None:
            return
        delta = delta.sparse  # the single entries beside the branches: a sparse delta on the weight
    parametrize.register_parametrization(module, tensor_name, delta, unsafe=True)
    kind = parametrize.type_before_parametrizations(module)
    if tensor_name == "weight" and kind is nn.Linear:
        type(module).forward = delta_linear_forward
    elif tensor_name == "weight" and kind is nn.Conv2d:
        prepare_conv(module, delta)
        type(module).forward = delta_conv_forward


def _check_untied(model: nn.Module, selection: Selection) -> None:
    seen: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        first = seen.setdefault(id(p), name)
        if first != name and (first in selection or name in selection):
            raise NotImplementedError(f"parameters {first!r} and {name!r} are one tied tensor; tuning tied weights is not supported")


def attach(model: nn.Module, selection: Selection, dropout: float | Mapping[str, float] = 0.0, drop_path: float = 0.0) -> nn.Module:
    """Freeze every parameter of ``model`` and attach a trainable delta for each selected tensor.

    Returns the same model object, changed in place. Only the deltas require grad afterwards.
    ``dropout`` (one rate, or a rate per parameter name) and ``drop_path`` regularise LoRA / adapter
    branches while the model is in training mode (SPT's setting; see ``tuning.branch``).
    """
    if is_attached(model):
        raise ValueError("model already has attached deltas; merge() and use a fresh base model, or load_delta() onto the base")
    params = dict(model.named_parameters())
    selection.check_model(params)
    _check_untied(model, selection)
    flags = {n: p.requires_grad for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(False)
    deltas: dict[str, nn.Module] = {}
    order = {}
    for name in selection.entries:
        module_name = name.rpartition(".")[0]
        order.setdefault(module_name, list((model.get_submodule(module_name) if module_name else model)._parameters))
    for name, entries in selection.entries.items():
        module, tensor_name = owner_of(model, name)
        rate = dropout.get(name, 0.0) if isinstance(dropout, Mapping) else dropout
        delta = make_delta(entries, params[name].device, dropout=rate, drop_path=drop_path)
        _register(module, tensor_name, delta)
        deltas[name] = delta
    setattr(model, STATE_ATTR, TuningState(selection, deltas, flags, param_order=order))
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimizer should see: the delta values / branch factors (in selection order).

    On a model without deltas (full fine-tuning, or plain ``requires_grad`` flags) these are the
    parameters that require grad, so a training loop needs no case for either.
    """
    if is_attached(model):
        return [t for d in tuning_state(model).deltas.values() for t in d.tensors().values()]
    return [p for p in model.parameters() if p.requires_grad]


def merge(model: nn.Module) -> nn.Module:
    """Fold the deltas into the weights in place; the result is the plain network, no parametrizations.

    The base values at the tuned entries are kept aside (for tuned tensors only), so that
    ``unmerge`` can restore the base exactly rather than by subtraction.
    """
    state = tuning_state(model)
    if state.merged:
        return model
    adapters = [n for n, d in state.deltas.items() if isinstance(d, AdapterDelta)]
    if adapters:
        raise ValueError(f"adapters are not mergeable (a GELU bottleneck, not a weight change): {adapters[:3]}; keep the model attached, or use SPT with structured='lora'")
    _remove(model, state)
    with torch.no_grad():
        for name, delta in state.deltas.items():
            module, tensor_name = owner_of(model, name)
            weight = getattr(module, tensor_name)
            state.base_values[name] = delta.gather(weight.detach()).clone()
            delta.add_to(weight.data, out=weight.data)
    for name, p in model.named_parameters():
        p.requires_grad_(state.requires_grad.get(name, p.requires_grad))
    state.merged = True
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo ``merge``: restore the base entries bit for bit and attach the same deltas again."""
    state = tuning_state(model)
    if not state.merged:
        return model
    with torch.no_grad():
        for name, delta in state.deltas.items():
            module, tensor_name = owner_of(model, name)
            delta.put(getattr(module, tensor_name).data, state.base_values.pop(name))
    for p in model.parameters():
        p.requires_grad_(False)
    for name, delta in state.deltas.items():
        module, tensor_name = owner_of(model, name)
        _register(module, tensor_name, delta)
    state.merged = False
    return model


def detach(model: nn.Module) -> nn.Module:
    """Drop the deltas (attached or merged) and give back the untouched base model."""
    state = tuning_state(model)
    unmerge(model)
    _remove(model, state)
    for name, p in model.named_parameters():
        p.requires_grad_(state.requires_grad.get(name, p.requires_grad))
    delattr(model, STATE_ATTR)
    return model
