"""Eligibility presets reproduce the reference name rules on timm ViT and segment-anything SAM."""

import pytest

from medseg_peft.selection.eligibility import PRESETS, assign_roles, resolve_rules


def test_vit_preset_roles(vit):
    roles = assign_roles(vit, "vit")
    for name, role in roles.items():
        if any(s in name for s in ("norm", "pos_embed", "cls_token")):
            assert role == "freeze", name
        elif name.startswith("head") or name.endswith("bias"):
            assert role == "train", name
        else:
            assert role == "select", name
    assert roles["patch_embed.proj.weight"] == "select"
    assert roles["blocks.0.norm1.bias"] == "freeze"  # norm wins over bias, as in the reference


def test_sam_preset_roles(sam):
    roles = assign_roles(sam, "sam")
    assert roles["image_encoder.blocks.0.attn.qkv.weight"] == "select"
    assert roles["image_encoder.patch_embed.proj.weight"] == "select"
    assert roles["image_encoder.neck.0.weight"] == "select"
    assert roles["image_encoder.neck.2.weight"] == "select"
    assert roles["image_encoder.blocks.0.attn.qkv.bias"] == "train"
    assert roles["image_encoder.neck.1.bias"] == "train"
    for frozen in ("image_encoder.pos_embed", "image_encoder.blocks.1.attn.rel_pos_h", "image_encoder.blocks.0.norm2.weight",
                   "image_encoder.blocks.0.norm2.bias", "image_encoder.neck.1.weight", "image_encoder.neck.3.weight"):
        assert roles[frozen] == "freeze", frozen
    outside = {n: r for n, r in roles.items() if not n.startswith("image_encoder.")}
    assert outside and set(outside.values()) == {"train"}


def test_auto_picks_sam_or_vit(sam, vit):
    assert assign_roles(sam, "auto") == assign_roles(sam, "sam")
    assert assign_roles(vit, "auto") == assign_roles(vit, "vit")


def test_unknown_preset_is_a_clear_error(vit):
    with pytest.raises(ValueError, match="unknown eligibility preset 'bert'"):
        assign_roles(vit, "bert")


def test_preset_that_selects_nothing_is_an_error(vit):
    with pytest.raises(ValueError, match="leaves no parameter"):
        assign_roles(vit, "sam")


def test_custom_rules_override_a_preset(vit):
    rules = [{"match": r"^blocks\.1\.", "role": "freeze"}, *PRESETS["vit"]]
    roles = assign_roles(vit, rules)
    assert roles["blocks.1.attn.qkv.weight"] == "freeze" and roles["blocks.0.attn.qkv.weight"] == "select"


@pytest.mark.parametrize("rule,msg", [({"role": "maybe"}, "role 'maybe'"), ({"role": "train", "regex": "x"}, "unknown key"),
                                       ({"match": "(", "role": "train"}, "bad regular expression")])
def test_bad_rules_are_named(rule, msg):
    with pytest.raises(ValueError, match=msg):
        resolve_rules([rule])
