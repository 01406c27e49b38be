"""Selection: which entries of a pre-trained model to train (scoring methods + shared choosing rules)."""

from medseg_peft.selection.base import Selector
from medseg_peft.selection.eligibility import PRESETS, assign_roles
from medseg_peft.selection.fps import FPS
from medseg_peft.selection.full import Full
from medseg_peft.selection.gps import GPS
from medseg_peft.selection.lora import LoRA
from medseg_peft.selection.partial import Partial
from medseg_peft.selection.spt import SPT
from medseg_peft.selection.registry import METHODS, selector
from medseg_peft.selection.rules import global_top, topk_per_row
from medseg_peft.selection.selection import Entries, Selection
from medseg_peft.selection.supcon import supcon_loss

__all__ = ["Entries", "FPS", "Full", "GPS", "LoRA", "METHODS", "PRESETS", "Partial", "SPT", "Selection", "Selector", "assign_roles", "global_top", "supcon_loss", "selector", "topk_per_row"]
