"""Which parameters a selector may choose from, which are trained whole, and which stay frozen.

The rules are data (lists of dicts), so a bundle or YAML config can pass its own list or extend a
preset. Each parameter takes the role of the first rule that matches it:

``{"match": regex, "exclude": regex, "min_ndim": int, "max_ndim": int, "role": "select"|"train"|"freeze"}``

``match`` / ``exclude`` are searched (``re.search``) in the parameter name; every key but ``role`` is
optional. A parameter no rule matches is frozen. The presets reproduce the name rules of the
reference code (FightingFighting/GPS ``utils/pruning.py`` for ViT, ``SAM/utils_/pruning.py`` for SAM):
the order matters, e.g. ``norm`` wins over ``bias`` so LayerNorm biases stay frozen. ``sam_tiny_vit``
applies the SAM rule to a TinyViT encoder's parts (convolutions with BatchNorms, attention-bias tables);
``"auto"`` picks it by the encoder's parameter names (:func:`is_tiny_vit`).
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping, Sequence

import torch

SELECT, TRAIN, FREEZE = "select", "train", "freeze"
ROLES = (SELECT, TRAIN, FREEZE)
# MobileSAM's TinyViT keeps its ImageNet head (norm_head, head) for strict loading; SAM never runs it
UNUSED_HEAD = re.compile(r"(^|\.)image_encoder\.(norm_head|head)\.")

PRESETS: dict[str, list[dict]] = {
    # timm ViT classification: weights of linear / conv layers selected; biases, layer-scale gammas
    # and the head fully trained; norms, position embeddings and the cls token frozen.
    "vit": [
        {"match": r"norm|pos_embed|cls_token", "role": FREEZE},
        {"match": r"head|bias|gamma", "role": TRAIN},
        {"min_ndim": 2, "role": SELECT},
        {"role": FREEZE},
    ],
    # segment-anything: only the image encoder's weights are selected; its biases trained; norms,
    # pos_embed, relative-position tables ("pos") and the neck's 1-D (LayerNorm2d) weights frozen;
    # prompt encoder and mask decoder fully trained. (A TinyViT encoder has its own preset below,
    # which "auto" picks; the head rule keeps MobileSAM's unused head out if "sam" is asked for.)
    "sam": [
        {"exclude": r"(^|\.)image_encoder\.", "role": TRAIN},
        {"match": UNUSED_HEAD.pattern, "role": FREEZE},
        {"match": r"norm|pos", "role": FREEZE},
        {"match": r"bias", "role": TRAIN},
        {"match": r"neck", "max_ndim": 1, "role": FREEZE},
        {"min_ndim": 2, "role": SELECT},
        {"role": FREEZE},
    ],
    # SAM with a TinyViT image encoder (MobileSAM, LiteMedSAM): the "sam" rule applied to TinyViT's parts.
    "sam_tiny_vit": [
        # prompt encoder and mask decoder: trained whole, as GPS trains SAM's
        {"exclude": r"(^|\.)image_encoder\.", "role": TRAIN},
        # MobileSAM's ImageNet head (norm_head, head): kept only so its checkpoint loads; it sees no input
        {"match": UNUSED_HEAD.pattern, "role": FREEZE},
        # LayerNorms (attn.norm, mlp.norm) and BatchNorm scales (bn.weight) are norms: frozen, as SAM's norms
        {"match": r"norm|\.bn\.weight$", "role": FREEZE},
        # attention-bias tables: TinyViT's position encoding, frozen as SAM's rel_pos_h / rel_pos_w
        {"match": r"\.attention_biases$", "role": FREEZE},
        # biases: the Linears' and the BatchNorm shifts (bn.bias), the bias of the bias-free convolutions: trained
        {"match": r"\.bias$", "role": TRAIN},
        # the neck's LayerNorm2d scales (1-D): frozen, as in the "sam" preset
        {"match": r"(^|\.)image_encoder\.neck\.", "max_ndim": 1, "role": FREEZE},
        # weights: patch-embedding, MBConv, patch-merging, local depthwise and neck convolutions (per output
        # channel), window-attention qkv / proj and MLP fc1 / fc2: selected
        {"min_ndim": 2, "role": SELECT},
        {"role": FREEZE},
    ],
}

_RULE_KEYS = {"match", "exclude", "min_ndim", "max_ndim", "role"}
ENCODER = re.compile(r"(^|\.)image_encoder\.")
HEAD = re.compile(r"(^|\.)head\.")
# SAM's ViT encoder has "image_encoder.blocks.N"; a TinyViT encoder has stages, "image_encoder.layers.S"
TINY_VIT = re.compile(r"(^|\.)image_encoder\.layers\.\d+\.")


def is_sam(model: torch.nn.Module) -> bool:
    """The one test for "is this a SAM?": it has an ``image_encoder`` (possibly under a wrapper)."""
    return any(ENCODER.search(n) for n, _ in model.named_parameters())


def in_tiny_vit(name: str) -> bool:
    """Whether parameter ``name`` lies in a TinyViT image encoder's stages (``image_encoder.layers.S.``)."""
    return bool(TINY_VIT.search(name))


def is_tiny_vit(model: torch.nn.Module) -> bool:
    """The one test for "is this a SAM with a TinyViT image encoder?" (MobileSAM, LiteMedSAM)."""
    return any(in_tiny_vit(n) for n, _ in model.named_parameters())


def auto_preset(model: torch.nn.Module) -> str:
    """The preset ``"auto"`` means for ``model``: ``"sam_tiny_vit"``, ``"sam"`` or ``"vit"``."""
    if is_tiny_vit(model):
        return "sam_tiny_vit"
    return "sam" if is_sam(model) else "vit"


def always_trained(model: torch.nn.Module) -> list[str]:
    """What every method here trains whole (GPS's rule): outside SAM's image encoder (prompt encoder and
    mask decoder), or a classifier's ``head``."""
    names = [n for n, _ in model.named_parameters()]
    if is_sam(model):
        return [n for n in names if not ENCODER.search(n)]
    return [n for n in names if HEAD.search(n)]


def resolve_rules(eligibility: str | Sequence[Mapping] | None, model: torch.nn.Module | None = None) -> list[dict]:
    """Turn a preset name, ``"auto"``/``None`` or a rule list into a checked rule list."""
    if eligibility is None or eligibility == "auto":
        if model is None:
            raise ValueError("eligibility 'auto' needs the model to look at")
        eligibility = auto_preset(model)
    if isinstance(eligibility, str):
        if eligibility not in PRESETS:
            raise ValueError(f"unknown eligibility preset {eligibility!r}; known presets: {sorted(PRESETS)} (or 'auto', or a list of rules)")
        return [dict(r) for r in PRESETS[eligibility]]
    rules = [dict(r) for r in eligibility]
    for i, rule in enumerate(rules):
        unknown = set(rule) - _RULE_KEYS
        if unknown:
            raise ValueError(f"eligibility rule {i} has unknown key(s) {sorted(unknown)}; allowed: {sorted(_RULE_KEYS)}")
        if rule.get("role") not in ROLES:
            raise ValueError(f"eligibility rule {i} has role {rule.get('role')!r}; expected one of {ROLES}")
        for key in ("match", "exclude"):
            if key in rule:
                try:
                    re.compile(rule[key])
                except re.error as err:
                    raise ValueError(f"eligibility rule {i}: bad regular expression {key}={rule[key]!r}: {err}") from err
    return rules


def role_of(name: str, ndim: int, rules: Iterable[Mapping]) -> str:
    for rule in rules:
        if "match" in rule and not re.search(rule["match"], name):
            continue
        if "exclude" in rule and re.search(rule["exclude"], name):
            continue
        if ndim < rule.get("min_ndim", 0) or ndim > rule.get("max_ndim", 1 << 30):
            continue
        return rule["role"]
    return FREEZE


def assign_roles(model: torch.nn.Module, eligibility: str | Sequence[Mapping] | None = "auto") -> dict[str, str]:
    """``{param_name: role}`` for every parameter of ``model``; raises if nothing is selectable."""
    rules = resolve_rules(eligibility, model)
    roles = {n: role_of(n, p.ndim, rules) for n, p in model.named_parameters()}
    if not any(r == SELECT for r in roles.values()):
        label = eligibility if isinstance(eligibility, str) else "the given rules"
        raise ValueError(
            f"eligibility {label!r} leaves no parameter of this {type(model).__name__} to select from "
            f"(names look like {list(roles)[:3]}); pick the preset that matches the model or pass rules"
        )
    return roles
