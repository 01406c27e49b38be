"""Box prompts for volumes, MedSAM's 3D protocol: box files beside the volumes, per-slice boxes, a slice inferer that passes them.

MedSAM segments a volume slice by slice, each slice prompted by the 2D boxes of the objects it shows.
For inference the user gives 3D boxes; a box spanning slices ``k1..k2`` prompts each of those slices
with its in-plane extent, and a slice no box spans is not run at all (its prediction is empty).

**Naming rule.** The boxes of a volume ``<folder>/<stem><suffix>`` are in ``<folder>/<stem>.boxes.json``
(``case_7.nii.gz`` -> ``case_7.boxes.json``; a DICOM series folder ``series_3/`` -> ``series_3.boxes.json``
beside it), or in ``<box_dir>/<stem>.boxes.json`` when ``box_dir`` is given.

**Box file.** ``{"boxes": [[i1, j1, k1, i2, j2, k2], ...]}``: inclusive voxel indices along the volume's
three array axes as stored (NIfTI's voxel order; 3D Slicer's IJK for NRRD / MHA / DICOM), min corner
then max corner. Each entry may instead be ``{"box": [...], "label": c}`` for class ``c`` (default 1).
Every file is checked before any inference work; a bad one stops the run with a one-line error that
names it.

**Axes.** Pre-processing orients every volume to RAS, so the network sees arrays ``[C, R, A, S]`` and
``SliceInferer(spatial_dim=2)`` hands it the slices ``[C, R, A]`` at each S index: a slice's height is
the R axis, its width the A axis. ``SamSegmenter`` reads boxes as ``xyxy`` with x along the width, so a
box ``[r1, a1, s1, r2, a2, s2]`` in the oriented grid prompts slices ``s1..s2`` with
``[x1, y1, x2, y2] = [a1, r1, a2, r2]``. The stored indices of the box file are first carried into the
oriented (and resampled) grid through the loaded and the pre-processed affines, so a volume stored in
any orientation gets its boxes where the user drew them.

This module is copied into exported bundles (``scripts/volume_boxes.py``, beside ``volume_io.py``) and
imports nothing from medseg_peft.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.inferers import SliceInferer
from monai.transforms import LoadImage, MapTransform, ResampleToMatch
from monai.utils import convert_to_dst_type

from .volume_files import volume_stem
from .volume_geometry import read_geometry
from .volume_io import (  # at import: MONAI Label takes the bundle off sys.path before transforms run
    NiftiReader,
    SimpleITKReader,
)

PROMPTS = ("none", "box")
BOX_SUFFIX = ".boxes.json"
BOX_FILE_KEY, BOX_KEY = "box_file", "box"
EMPTY_LOGIT = -20.0  # SamSegmenter's logit for an output channel no box asks for: a slice no box spans is all this


def check_prompt(prompt: str) -> str:
    """``prompt`` when it is one of :data:`PROMPTS`; otherwise a ``ValueError`` naming them."""
    if prompt not in PROMPTS:
        raise ValueError(f"prompt must be one of {PROMPTS}, got {prompt!r}")
    return prompt


def box_file_for(image: str | Path, box_dir: str | Path | None = None) -> Path:
    """Where the boxes of ``image`` are: ``<stem>.boxes.json`` beside it, or in ``box_dir``."""
    folder = Path(image).parent if box_dir in (None, "", "None", "null") else Path(box_dir).expanduser()
    return folder / f"{volume_stem(image)}{BOX_SUFFIX}"


def read_volume_boxes(path: str | Path, shape: Sequence[int], num_classes: int | None = None) -> list[dict]:
    """The boxes of one image or volume from its JSON file, checked against its array ``shape``.

    ``{"boxes": [[x1, y1, x2, y2], ...]}`` for a 2D image of shape ``(H, W)`` (pixels, x along the
    width), ``{"boxes": [[i1, j1, k1, i2, j2, k2], ...]}`` for a volume of shape ``(X, Y, Z)`` (voxel
    indices along its stored axes); each entry may instead be ``{"box": [...], "label": class}``
    (default class 1), and ``num_classes`` bounds the labels. Returns ``[{"box": [...], "label": c}]``;
    anything else is a ``ValueError`` of one line that names the file. (It lives here, with no import of
    medseg_peft, because exported bundles carry this module.)
    """
    path = Path(path)
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    # a 2D image's x, y index its axes 1, 0; a volume's i, j, k its axes 0, 1, 2
    sizes, axes = ((shape[1], shape[0]), "x, y") if ndim == 2 else (shape, "i, j, k")
    if not path.is_file():
        raise ValueError(f"box file {path} does not exist (prompt 'box' reads <image stem>{BOX_SUFFIX} beside each image, or in box_dir)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"box file {path} could not be read as JSON: {' '.join(str(err).split())}") from None
    entries = raw.get("boxes") if isinstance(raw, dict) else raw
    if not isinstance(entries, list) or not entries:
        example = "[x1, y1, x2, y2]" if ndim == 2 else "[i1, j1, k1, i2, j2, k2]"
        raise ValueError(f"box file {path}: expected {{\"boxes\": [{example}, ...]}} with at least one box")
    out = []
    for n, entry in enumerate(entries):
        box, label = (entry.get("box"), entry.get("label", 1)) if isinstance(entry, dict) else (entry, 1)
        if (not isinstance(box, list) or len(box) != 2 * ndim
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
            raise ValueError(f"box file {path}: box {n} is {box!r}, expected {2 * ndim} numbers (min then max corner) for a {ndim}D image")
        low, high = box[:ndim], box[ndim:]
        if any(lo > hi for lo, hi in zip(low, high)):
            raise ValueError(f"box file {path}: box {n} {box} is empty (a min corner above its max corner)")
        if any(lo < 0 or hi > size - 1 for lo, hi, size in zip(low, high, sizes)):
            raise ValueError(f"box file {path}: box {n} {box} lies outside the image (size {list(sizes)} as {axes})")
        if not isinstance(label, int) or isinstance(label, bool) or label < 1:
            raise ValueError(f"box file {path}: box {n} has label {label!r}; labels are classes 1, 2, ...")
        if num_classes is not None and label > int(num_classes):
            raise ValueError(f"box file {path}: box {n} has label {label}, but the model segments classes 1..{int(num_classes)}")
        out.append({"box": [float(v) for v in box], "label": label})
    return out


def box_datalist(images: Sequence[str | Path], prompt: str = "none", box_dir: str | Path | None = None,
                 num_classes: int | None = None, activation: str | None = None) -> list[dict]:
    """The inference datalist: ``{"image": path}`` per volume, and with ``prompt="box"`` its checked ``"box_file"``.

    Every box file is read and checked against its volume's header (shape only: no voxels are read) here,
    before the network is built or any volume loaded, so a bad file stops the run at once.
    ``activation`` is the model's: box prompts need its per-class sigmoid outputs.
    """
    if check_prompt(prompt) == "none":
        return [{"image": p} for p in images]
    if activation not in (None, "sigmoid"):
        raise ValueError(f"prompt 'box' needs a model with per-class sigmoid outputs (activation 'sigmoid'), but activation is {activation!r}")
    out = []
    for image in images:
        path = box_file_for(image, box_dir)
        read_volume_boxes(path, read_geometry(image).shape, num_classes)
        out.append({"image": image, BOX_FILE_KEY: str(path)})
    return out


def grid_boxes(boxes: Sequence[dict], source_affine, target_affine, target_shape: Sequence[int]) -> list[tuple[list[int], list[int], int]]:
    """Voxel boxes of the grid with ``source_affine`` -> ``(low, high, label)`` voxel boxes of the grid with ``target_affine``.

    A box covers its voxels' full extent (index +- 0.5); its corners go through both affines, and the
    target voxels whose centres lie inside make the new box (at least one voxel along each axis), clipped
    to ``target_shape``. Orientation (axis flips and permutations) maps boxes exactly.
    """
    source = np.asarray(source_affine, dtype=np.float64)
    target = np.asarray(target_affine, dtype=np.float64)
    index = np.linalg.solve(target, source)  # source voxel index -> target voxel index
    shape = [int(s) for s in target_shape]
    out = []
    for entry in boxes:
        b = np.asarray(entry["box"], dtype=np.float64)
        corners = np.array(list(itertools.product(*[(b[a] - 0.5, b[a + 3] + 0.5) for a in range(3)])))
        mapped = corners @ index[:3, :3].T + index[:3, 3]
        lo_f, hi_f = mapped.min(0), mapped.max(0)
        low, high = [], []
        for a in range(3):
            lo, hi = math.ceil(lo_f[a] - 1e-3), math.floor(hi_f[a] + 1e-3)
            if lo > hi:  # thinner than one target voxel: the voxel at its centre
                lo = hi = int(round((lo_f[a] + hi_f[a]) / 2))
            low.append(min(max(lo, 0), shape[a] - 1))
            high.append(min(max(hi, 0), shape[a] - 1))
        out.append((low, high, int(entry["label"])))
    return out


def slice_prompts(boxes: Sequence[tuple[Sequence[int], Sequence[int], int]], shape: Sequence[int], spatial_dim: int = 2) -> torch.Tensor:
    """Voxel boxes ``(low, high, label)`` of a volume of ``shape`` -> ``[slices, N, 5]`` 2D boxes per slice along ``spatial_dim``.

    A slice keeps the other two axes in order (height, width), so x is the later axis; the fifth column
    is the output channel, ``label - 1``. A box absent from a slice is a row of -1 there.
    """
    height, width = [a for a in range(3) if a != spatial_dim]
    out = torch.full((int(shape[spatial_dim]), max(1, len(boxes)), 5), -1.0)
    for n, (low, high, label) in enumerate(boxes):
        row = torch.tensor([low[width], low[height], high[width], high[height], label - 1], dtype=torch.float32)
        out[low[spatial_dim] : high[spatial_dim] + 1, n] = row
    return out


class VolumeBoxesd(MapTransform):
    """``"box_file"`` -> ``"box"``: the file's voxel boxes as per-slice 2D boxes ``[slices, N, 5]`` of the pre-processed image.

    Place it after the spatial pre-processing (orientation, resampling): the boxes are carried from the
    stored grid (the image's ``original_affine``) into the image's current grid (its ``affine``).
    Items without ``"box_file"`` pass unchanged with ``allow_missing_keys`` (prompt-free inference).
    """

    def __init__(self, keys: KeysCollection = BOX_FILE_KEY, image_key: str = "image", box_key: str = BOX_KEY,
                 spatial_dim: int = 2, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.image_key, self.box_key, self.spatial_dim = image_key, box_key, int(spatial_dim)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[self.image_key]
            meta = image.meta if isinstance(image, MetaTensor) else {}
            if "original_affine" not in meta:
                raise ValueError(f"{self.image_key!r} carries no original_affine to place the boxes of {d[key]}: load it with LoadImaged")
            stored = [int(s) for s in np.asarray(meta["spatial_shape"]).reshape(-1)[:3]]
            boxes = read_volume_boxes(d[key], stored)
            shape = tuple(image.shape[1:])
            placed = grid_boxes(boxes, meta["original_affine"], image.affine, shape)
            d[self.box_key] = slice_prompts(placed, shape, self.spatial_dim)
        return d


class LabelBoxesd(MapTransform):
    """A coarse label or ROI volume given with the request (``"label"``: MONAI Label's ``/infer`` puts an uploaded
    label's path there) -> ``"box"``: per-slice boxes ``[slices, classes, 5]`` on the pre-processed image grid.

    MedSAM's protocol with a rough mask in place of the truth: each slice is prompted by one box per class,
    the in-plane extent of that class's voxels there; slices the label does not touch get no box. The label
    is resampled onto the image (nearest neighbour, through both affines), so it may come on any grid.
    ``prompt`` other than ``"box"`` makes the step pass items unchanged (a prompt-free model ignores it).
    The boxes also ride in the image's metadata, for inferers called with the image alone.
    """

    def __init__(self, keys: KeysCollection = "label", image_key: str = "image", box_key: str = BOX_KEY, prompt: str = "box",
                 num_classes: int | None = None, spatial_dim: int = 2, allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)
        self.image_key, self.box_key, self.spatial_dim = image_key, box_key, int(spatial_dim)
        self.enabled = check_prompt(prompt) == "box"
        self.num_classes = None if num_classes is None else int(num_classes)

    def __call__(self, data):
        d = dict(data)
        if not self.enabled:
            return d
        for key in list(self.key_iterator(d)):
            source = d.pop(key)
            roi = source
            if isinstance(roi, (str, Path)):
                roi = LoadImage(reader=[SimpleITKReader(), NiftiReader()], image_only=True, ensure_channel_first=True)(str(roi))
            image = d[self.image_key]
            labels = np.rint(np.asarray(ResampleToMatch(mode="nearest")(roi, img_dst=image)[0])).astype(np.int64)
            classes = sorted(int(v) for v in np.unique(labels) if v > 0)
            if self.num_classes is not None and classes and classes[-1] > self.num_classes:
                raise ValueError(f"label {source} holds value {classes[-1]}, but the model segments classes 1..{self.num_classes}")
            if not classes:
                raise ValueError(f"label {source} marks no voxel of the image: box prompts need a class drawn where to segment")
            planes = np.moveaxis(labels, self.spatial_dim, 0)  # [slices, height, width]
            prompts = torch.full((planes.shape[0], len(classes), 5), -1.0)
            for n, value in enumerate(classes):  # one row per class: the class's in-plane extent on each slice it touches
                for k, plane in enumerate(planes == value):
                    rows, cols = np.nonzero(plane)
                    if rows.size:
                        prompts[k, n] = torch.tensor([cols.min(), rows.min(), cols.max(), rows.max(), value - 1], dtype=torch.float32)
            d[self.box_key] = prompts
            if isinstance(image, MetaTensor):
                image.meta[self.box_key] = prompts
        return d


class BoxSliceInferer(SliceInferer):
    """``SliceInferer`` that also passes each slice its boxes: ``inferer(volume, network, boxes=[B, slices, N, 4|5])``.

    Without ``boxes`` it is MONAI's ``SliceInferer`` unchanged (prompt-free). With boxes the slices must be
    whole (``roi_size`` of -1s): slices holding at least one box go to ``network(slices, boxes=...)`` in
    batches of ``sw_batch_size``, and the others are left empty (``EMPTY_LOGIT`` on every channel), which
    is what the network returns for a slice with no box.
    """

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, boxes: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        if boxes is None and isinstance(inputs, MetaTensor) and BOX_KEY in inputs.meta:
            boxes = torch.as_tensor(inputs.meta[BOX_KEY])  # LabelBoxesd's, for a caller that passes the image alone (MONAI Label)
            boxes = boxes[None] if boxes.ndim == 3 else boxes
        if boxes is None:
            return super().__call__(inputs, network, *args, **kwargs)
        d = int(self.spatial_dim)
        if inputs.ndim != 5 or not 0 <= d <= 2:
            raise ValueError(f"box slice inference takes volumes [B, C, H, W, D] and spatial_dim 0..2, "
                             f"got shape {tuple(inputs.shape)}, spatial_dim {d}")
        plane = [s for a, s in enumerate(inputs.shape[2:]) if a != d]
        roi = [int(r) for r in self.orig_roi_size]
        if len(roi) != 2 or any(r not in (-1, s) for r, s in zip(roi, plane)):
            raise ValueError(f"box prompts need whole slices: roi_size [-1, -1] (got {roi} for slices of size {plane})")
        count = inputs.shape[2 + d]
        boxes = torch.as_tensor(boxes)
        if boxes.ndim != 4 or tuple(boxes.shape[:2]) != (inputs.shape[0], count) or boxes.shape[-1] not in (4, 5):
            raise ValueError(f"boxes for slice inference must be [B, {count} slices, N, 4 or 5], got shape {tuple(boxes.shape)}")
        x = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        volumes = []
        for b in range(x.shape[0]):
            slices = x[b].movedim(d + 1, 0)  # [slices, C, height, width]
            prompted = (~(boxes[b, ..., :4] < 0).all(-1)).any(-1).nonzero().flatten()
            if prompted.numel() == 0:  # no box anywhere: one slice still runs, to give the output's channels
                prompted = torch.zeros(1, dtype=torch.long, device=boxes.device)
            pred = None
            for chunk in prompted.split(int(self.sw_batch_size)):
                out = network(slices[chunk.to(slices.device)], *args, boxes=boxes[b, chunk], **kwargs)
                if pred is None:
                    pred = out.new_full((count, *out.shape[1:]), EMPTY_LOGIT)
                pred[chunk.to(pred.device)] = out
            volumes.append(pred.movedim(0, d + 1))
        out = torch.stack(volumes).float()
        return convert_to_dst_type(out, inputs, device=out.device)[0]


__all__ = [
    "BOX_SUFFIX",
    "BoxSliceInferer",
    "LabelBoxesd",
    "VolumeBoxesd",
    "box_datalist",
    "box_file_for",
    "grid_boxes",
    "read_volume_boxes",
    "slice_prompts",
]
