"""Data: batch conventions now; 2D folders, volumes, synthetic sets and FGVC / VTAB-1k to come."""

from medseg_peft.data.batches import iter_batches, split_batch

__all__ = ["iter_batches", "split_batch"]
