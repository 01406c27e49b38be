"""Selection: which entries of a pre-trained model to train (scoring methods + shared choosing rules)."""

from medseg_peft.entries import Entries, Selection
from medseg_peft.selection.base import ScoredSelector, Selector
from medseg_peft.selection.batches import iter_batches, split_batch
from medseg_peft.selection.decoder import Decoder
from medseg_peft.selection.eligibility import PRESETS, always_trained, assign_roles, is_sam, is_tiny_vit
from medseg_peft.selection.fps import FPS
from medseg_peft.selection.full import Full
from medseg_peft.selection.gps import GPS
from medseg_peft.selection.lora import LoRA
from medseg_peft.selection.partial import Partial
from medseg_peft.selection.registry import METHODS, selector, settings_of
from medseg_peft.selection.rules import global_top, topk_per_row
from medseg_peft.selection.spt import SPT
from medseg_peft.selection.supcon import supcon_loss

__all__ = ["Decoder", "Entries", "FPS", "Full", "GPS", "LoRA", "METHODS", "PRESETS", "Partial", "SPT", "ScoredSelector", "Selection", "Selector",
           "always_trained", "assign_roles", "global_top", "is_sam", "is_tiny_vit", "iter_batches", "selector", "settings_of", "split_batch",
           "supcon_loss", "topk_per_row"]
