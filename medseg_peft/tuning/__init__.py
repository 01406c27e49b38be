"""Tuning: trainable index + value deltas over frozen weights; attach, merge, unmerge, save, load."""

from medseg_peft.tuning.attach import attach, detach, is_attached, merge, trainable_parameters, tuning_state, unmerge
from medseg_peft.tuning.base_dtype import cast_base
from medseg_peft.tuning.checkpoint import load_delta, save_delta
from medseg_peft.tuning.delta import Delta
from medseg_peft.tuning.soup import soup

__all__ = ["Delta", "attach", "cast_base", "detach", "is_attached", "load_delta", "merge", "save_delta", "soup", "trainable_parameters", "tuning_state", "unmerge"]
