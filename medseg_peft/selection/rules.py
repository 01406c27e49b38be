"""Choosing rules shared by every selector: scores in, trainable entries out.

Ties are broken towards the lower index (a stable sort), so the same scores always give the same
entries, on any device.
"""

from __future__ import annotations

from typing import Mapping

import torch

from medseg_peft.entries import FLAT, ROWS, WHOLE, Entries, row_view_shape


def check_positive_int(value, what: str, meaning: str = "") -> int:
    """``value`` if it is a positive integer (not a bool), else a ``ValueError`` naming ``what`` it is for."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{what} must be a positive integer{f' ({meaning})' if meaning else ''}, got {value!r}")
    return value


def check_rate(value, what: str) -> float:
    """``value`` if it is a probability in ``[0, 1)`` (a dropout or drop-path rate), else a ``ValueError``."""
    if not 0 <= value < 1:
        raise ValueError(f"{what} must be in [0, 1), got {value!r}")
    return value


def check_k(k: int) -> int:
    return check_positive_int(k, "k", "entries per output row")


def topk_per_row(score: torch.Tensor, k: int, name: str = "parameter") -> Entries:
    """The ``k`` highest-scoring columns of every output row (conv kernels flattened to ``[out, in*kh*kw]``).

    A tensor whose rows hold fewer than ``k`` entries (a 1x1 convolution on 3 input channels, a 3x3
    depthwise kernel under K = 16) is trained whole: its top K is every entry.
    """
    check_k(k)
    rows, cols = row_view_shape(tuple(score.shape))
    if k > cols:
        return Entries(WHOLE, tuple(score.shape))
    s = score.detach().reshape(rows, cols).float()
    # topk is ~25x cheaper than a full sort, but its choice among equal scores is unspecified; the set
    # it returns is only ambiguous in rows where the k-th and (k+1)-th scores tie, so those rows alone
    # are re-ranked with a stable sort (ties go to the lower column).
    values, order = s.topk(min(k + 1, cols), dim=1)
    order = order[:, :k]
    if k < cols:
        tied = torch.nonzero(values[:, k - 1] == values[:, k]).flatten()
        if tied.numel():
            order[tied] = torch.sort(s[tied], dim=1, descending=True, stable=True).indices[:, :k]
    return Entries(ROWS, tuple(score.shape), torch.sort(order, dim=1).values)


def global_top(scores: Mapping[str, torch.Tensor], n: int) -> dict[str, Entries]:
    """The ``n`` highest-scoring entries over all given tensors together, as flat index sets.

    Tensors with no chosen entry are left out of the result.
    """
    check_positive_int(n, "the global budget")
    total = sum(s.numel() for s in scores.values())
    if n > total:
        raise ValueError(f"budget {n} is larger than the {total} eligible entries")
    flat = torch.cat([s.detach().reshape(-1).float().cpu() for s in scores.values()])
    # Threshold at the n-th largest score; take everything above it and, among scores equal to it,
    # the lowest positions in (name order, flat index) until n is reached.
    threshold = torch.kthvalue(flat, total - n + 1).values
    above = flat > threshold
    need = n - int(above.sum())
    equal = torch.nonzero(flat == threshold).flatten()[:need]
    keep = above
    keep[equal] = True
    out: dict[str, Entries] = {}
    start = 0
    for name, s in scores.items():
        idx = torch.nonzero(keep[start : start + s.numel()]).flatten()
        start += s.numel()
        if idx.numel():
            out[name] = Entries(FLAT, tuple(s.shape), idx)
    return out
