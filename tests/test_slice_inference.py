"""SliceInferer over the axial slices of a RAS volume; layouts and synthetic organs are in test_volume_folders, IO in test_volume_io."""

from __future__ import annotations

import torch
from monai.inferers import SliceInferer


def test_slice_inferer_on_a_slice_count_not_a_multiple_of_the_batch():
    """Axial slices (last axis of a RAS volume) in batches of 4 over 7 slices: every slice seen once, in place."""
    seen = []

    def net(x):
        seen.append(x.shape[0])
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x) * 2  # per-slice value, so a misplaced slice shows

    volume = torch.arange(7, dtype=torch.float32).reshape(1, 1, 1, 1, 7).expand(1, 1, 10, 9, 7).contiguous()
    out = SliceInferer(roi_size=(-1, -1), spatial_dim=2, sw_batch_size=4, progress=False)(volume, net)
    assert out.shape == volume.shape and sum(seen) == 7 and max(seen) == 4
    torch.testing.assert_close(out, volume * 2)
