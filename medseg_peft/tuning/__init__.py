"""Tuning: trainable index + value deltas over frozen weights; attach, merge, unmerge, save, load, and the
trainable part of a network as a checkpoint (``TunedState``) or a result file (``save_tuned`` / ``load_tuned``)."""

from medseg_peft.tuning.attach import attach, detach, is_attached, merge, trainable_parameters, tuning_state, unmerge
from medseg_peft.tuning.base_dtype import cast_base
from medseg_peft.tuning.checkpoint import load_delta, save_delta
from medseg_peft.tuning.delta import Delta
from medseg_peft.tuning.soup import soup
from medseg_peft.tuning.tuned_state import TunedState, load_tuned, save_tuned

__all__ = ["Delta", "TunedState", "attach", "cast_base", "detach", "is_attached", "load_delta", "load_tuned", "merge", "save_delta", "save_tuned", "soup",
           "trainable_parameters", "tuning_state", "unmerge"]
