"""Models: SAM builders and the segmentation wrapper (a ViT classifier follows with the classification path)."""

from medseg_peft.models.sam import SAM_VARIANTS, SamSegmenter, build_sam, demo_segmenter, detect_variant, read_sam_state_dict, sam_segmenter

__all__ = ["SAM_VARIANTS", "SamSegmenter", "build_sam", "demo_segmenter", "detect_variant", "read_sam_state_dict", "sam_segmenter"]
