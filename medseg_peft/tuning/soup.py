"""Model soups of tuned runs that share a base model: average what each run changed.

Each ingredient (a tuned model, attached or merged, or a delta file with the base model given) is
turned into its dense change ``delta_i`` of every tuned tensor; the soup is the plain base model with
``W = W0 + sum_i w_i * delta_i``. Averaging changes rather than whole weights means runs that tuned
different entries (other seeds, other methods) still mix: an entry tuned by one run of three moves a
third of the way. The greedy variant (Wortsman et al., 2022) ranks ingredients by their own score and
keeps one only if the soup's score does not drop.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from medseg_peft.tuning.attach import detach, is_attached, tuning_state
from medseg_peft.tuning.checkpoint import load_delta

Ingredient = nn.Module | str | Path


def _changes(item: Ingredient, base: nn.Module | None) -> tuple[dict[str, torch.Tensor], nn.Module | None]:
    """``{param_name: dense change}`` of one ingredient, and a plain base model if it can provide one."""
    if isinstance(item, (str, Path)):
        if base is None:
            raise ValueError(f"soup ingredient {item} is a delta file: pass base= (the base model it was trained on)")
        item = load_delta(copy.deepcopy(base), item)
    if not is_attached(item):
        raise ValueError(f"soup ingredient {type(item).__name__} carries no deltas: pass tuned models or delta files")
    state = tuning_state(item)
    changes = {}
    with torch.no_grad():
        for name, delta in state.deltas.items():
            zeros = torch.zeros(delta.shape, dtype=torch.float32, device=next(delta.parameters()).device)
            changes[name] = delta.add_to(zeros)
    plain = detach(copy.deepcopy(item)) if base is None else None
    return changes, plain


def _check_same_base(model: nn.Module, base: nn.Module, position: int) -> None:
    """Refuse an ingredient whose frozen base differs from the soup's base (another checkpoint)."""
    params = dict(base.named_parameters())
    for name in tuning_state(model).deltas:
        module_name, _, tensor_name = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        original = module.parametrizations[tensor_name].original if parametrize.is_parametrized(module, tensor_name) else None
        if original is not None and (name not in params or not torch.equal(original, params[name])):
            raise ValueError(f"soup ingredient {position} was tuned on another base model ({name!r} differs); soups need one shared base")


def soup(
    ingredients: Sequence[Ingredient],
    weights: Sequence[float] | None = None,
    *,
    base: nn.Module | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
) -> nn.Module:
    """A plain model whose tuned tensors are the base plus the weighted mean of the ingredients' changes.

    ``weights`` default to uniform. With ``evaluate`` (model -> score, higher is better) the soup is
    greedy: ingredients in order of their own score, each kept only if the soup's score does not drop
    (``weights`` must then be left out).
    """
    if not ingredients:
        raise ValueError("soup needs at least one ingredient")
    parts = [_changes(item, base) for item in ingredients]
    base_model = base if base is not None else parts[0][1]
    for i, item in enumerate(ingredients):
        if isinstance(item, nn.Module):
            _check_same_base(item, base_model, i)
    if evaluate is not None:
        if weights is not None:
            raise ValueError("a greedy soup picks its own ingredients: leave weights=None")
        return _greedy(parts, base_model, evaluate)
    if weights is None:
        weights = [1.0 / len(parts)] * len(parts)
    if len(weights) != len(parts):
        raise ValueError(f"soup got {len(weights)} weights for {len(parts)} ingredients")
    return _mix([p[0] for p in parts], list(weights), base_model)


def _mix(changes: list[dict[str, torch.Tensor]], weights: list[float], base: nn.Module) -> nn.Module:
    model = copy.deepcopy(base)
    params = dict(model.named_parameters())
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    with torch.no_grad():
        for name in {n for c in changes for n in c}:
            if name not in params or shapes[name] != tuple(changes[0].get(name, params[name]).shape):
                raise ValueError(f"soup ingredients tune {name!r}, which the base model does not have in that shape")
            total = sum(w * c[name] for w, c in zip(weights, changes) if name in c)
            params[name].add_(total.to(params[name].dtype))
    return model


def _greedy(parts, base: nn.Module, evaluate: Callable[[nn.Module], float]) -> nn.Module:
    changes = [p[0] for p in parts]
    solo = [evaluate(_mix([c], [1.0], base)) for c in changes]
    order = sorted(range(len(changes)), key=lambda i: -solo[i])
    kept = [order[0]]
    best = solo[order[0]]
    for i in order[1:]:
        trial = kept + [i]
        score = evaluate(_mix([changes[j] for j in trial], [1.0 / len(trial)] * len(trial), base))
        if score >= best:
            kept, best = trial, score
    return _mix([changes[j] for j in kept], [1.0 / len(kept)] * len(kept), base)


__all__ = ["soup"]
