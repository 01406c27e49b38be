"""Models: SAM builders (ViT and TinyViT encoders), the segmentation wrapper and named checkpoints."""

from medseg_peft.models.sam import SAM_VARIANTS, build_sam, detect_variant, read_sam_state_dict
from medseg_peft.models.segmenter import SamSegmenter, demo_segmenter, sam_segmenter

__all__ = ["SAM_VARIANTS", "SamSegmenter", "build_sam", "demo_segmenter", "detect_variant", "read_sam_state_dict", "sam_segmenter"]
