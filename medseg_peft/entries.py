"""The one data type between "which weights" and "train them": :class:`Selection`, its :class:`Entries`,
their layouts and their file format.

A :class:`Selection` names, per parameter, the entries that will be trained. It knows nothing of how
the entries were scored (that is a selector's job) nor of how they are trained (that is
``medseg_peft.tuning``), so both sides can change independently and a selection can be saved,
inspected and re-applied to a fresh copy of the base model. It sits below both: tuning reads this
format and never a selector, and selectors write it and then attach it through tuning.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors import safe_open

from medseg_peft.io import atomic_save_safetensors

ROWS = "rows"  # per output row, K column indices: index [rows, K] over the weight viewed as [rows, -1]
FLAT = "flat"  # a set of flat indices into the parameter
WHOLE = "whole"  # the whole tensor is trainable
LORA = "lora"  # low-rank branches x -> B(A x) of the given rank beside a Linear, one per row block; mergeable
ADAPTER = "adapter"  # bottlenecks of the given rank on a Linear's output (or beside it) per row block (SPT); not mergeable
LAYOUTS = (ROWS, FLAT, WHOLE, LORA, ADAPTER)

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Entries:
    """The trainable entries of one parameter.

    ``index`` is ``[rows, K]`` column indices for ``rows`` (sorted per row, unique), a sorted 1-D
    tensor of unique flat indices for ``flat``, and ``None`` for ``whole``. Indices are kept as int64
    in memory (what scatter / gather want) and shrunk to the smallest integer type on disk.

    ``lora`` and ``adapter`` entries are branches beside an ``nn.Linear`` with a ``rank``: one branch
    per row block in ``blocks`` (``(start, stop)`` output rows; ``None`` is one branch over all rows).
    Row blocks make q, k and v of a fused ``qkv`` weight three units, as in SPT's model where they
    are three Linears. Such an entry may also hold a flat ``index`` of single entries trained beside
    the branches, outside their blocks (SPT on a fused qkv where q's entries are sparse and v has a
    LoRA). ``on_input`` places an adapter beside the layer, on its input (SPT's attention
    projection), instead of on its output.
    """

    layout: str
    shape: tuple[int, ...]
    index: torch.Tensor | None = None
    rank: int | None = None
    blocks: tuple[tuple[int, int], ...] | None = None
    on_input: bool = False

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; expected one of {LAYOUTS}")
        if self.layout in (LORA, ADAPTER):
            self._check_branch()
        else:
            if self.rank is not None or self.blocks is not None or self.on_input:
                raise ValueError(f"a {self.layout!r} entry takes no rank, blocks or on_input")
            if self.layout == WHOLE:
                if self.index is not None:
                    raise ValueError("a 'whole' entry takes no index")
                return
            if self.index is None:
                raise ValueError(f"a {self.layout!r} entry needs an index tensor")
        if self.index is None:
            return
        object.__setattr__(self, "index", self.index.to(torch.long).cpu().contiguous())
        if self.layout == ROWS:
            rows, cols = row_view_shape(self.shape)
            if self.index.ndim != 2 or self.index.shape[0] != rows:
                raise ValueError(
                    f"a 'rows' index for shape {self.shape} must be [{rows}, K], got {tuple(self.index.shape)}"
                )
            bound = cols
        else:
            if self.index.ndim != 1:
                raise ValueError(f"a 'flat' index must be 1-D, got shape {tuple(self.index.shape)}")
            bound = _numel(self.shape)
        if self.index.numel() and (int(self.index.min()) < 0 or int(self.index.max()) >= bound):
            raise ValueError(f"index out of range [0, {bound}) for a parameter of shape {self.shape}")
        if self.layout in (LORA, ADAPTER) and self.index.numel():
            row_of = self.index // row_view_shape(self.shape)[1]
            if any(bool(((row_of >= a) & (row_of < b)).any()) for a, b in self.row_blocks()):
                raise ValueError(f"a {self.layout!r} entry's single entries must lie outside its branches' row blocks {self.row_blocks()}")

    def _check_branch(self) -> None:
        rows, _ = row_view_shape(self.shape)
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise ValueError(f"a {self.layout!r} entry takes a positive integer rank, got rank={self.rank!r}")
        if self.on_input and self.layout != ADAPTER:
            raise ValueError("only an adapter can be placed on the layer's input (on_input)")
        if self.blocks is not None:
            blocks = tuple(sorted((int(a), int(b)) for a, b in self.blocks))
            if not blocks or any(not 0 <= a < b <= rows for a, b in blocks) or any(b > c for (_, b), (c, _) in zip(blocks, blocks[1:])):
                raise ValueError(f"row blocks must be non-empty, non-overlapping (start, stop) ranges within [0, {rows}), got {self.blocks}")
            object.__setattr__(self, "blocks", blocks)
            if self.on_input and len(blocks) > 1:
                raise ValueError("an adapter on the layer's input is one branch over all its output rows")

    def row_blocks(self) -> tuple[tuple[int, int], ...]:
        """The ``(start, stop)`` output rows of each branch (one block over every row when ``blocks`` is None)."""
        return self.blocks if self.blocks is not None else ((0, row_view_shape(self.shape)[0]),)

    @property
    def count(self) -> int:
        """Number of trainable scalars."""
        if self.layout in (LORA, ADAPTER):
            cols = row_view_shape(self.shape)[1]
            sparse = 0 if self.index is None else self.index.numel()
            return sparse + sum(branch_cost(self.layout, b - a, cols, self.rank, self.on_input) for a, b in self.row_blocks())
        return _numel(self.shape) if self.layout == WHOLE else self.index.numel()

    @property
    def numel(self) -> int:
        return _numel(self.shape)

    @property
    def k(self) -> int | None:
        return self.index.shape[1] if self.layout == ROWS else None

    def mask(self) -> torch.Tensor:
        """Boolean tensor of the parameter's shape, True where trainable (a branch reaches every entry of its rows)."""
        if self.layout == WHOLE:
            return torch.ones(self.shape, dtype=torch.bool)
        if self.layout in (LORA, ADAPTER):
            m = torch.zeros(row_view_shape(self.shape), dtype=torch.bool)
            for a, b in self.row_blocks():
                m[a:b] = True
            if self.index is not None:
                m.view(-1)[self.index] = True
            return m.view(self.shape)
        if self.layout == ROWS:
            m = torch.zeros(row_view_shape(self.shape), dtype=torch.bool)
            m.scatter_(1, self.index, True)
            return m.view(self.shape)
        m = torch.zeros(self.numel, dtype=torch.bool)
        m[self.index] = True
        return m.view(self.shape)

    def describe(self) -> str:
        if self.layout == ROWS:
            return f"top-{self.k}/row"
        if self.layout in (LORA, ADAPTER):
            text = f"{self.layout} r={self.rank}" + (" on input" if self.on_input else "")
            if self.blocks is not None:
                text += " rows " + ",".join(f"{a}:{b}" for a, b in self.blocks)
            return text + (f" +{self.index.numel()} single" if self.index is not None else "")
        return "sparse" if self.layout == FLAT else "whole"


def branch_cost(layout: str, rows: int, cols: int, rank: int, on_input: bool = False) -> int:
    """Trainable scalars of one branch over ``rows`` output rows of a ``[rows, cols]`` weight: LoRA
    ``rank * (cols + rows)``; an adapter on the output ``2 * rank * rows + rank + rows`` (down and up
    with biases), on the input ``rank * cols + rank + rows * rank + rows``."""
    if layout == LORA:
        return rank * (cols + rows)
    if on_input:
        return rank * cols + rank + rows * rank + rows
    return 2 * rank * rows + rank + rows


def row_view_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """``[out, in*kh*kw...]``: the matrix whose rows are output neurons (conv kernels flattened)."""
    if len(shape) < 2:
        raise ValueError(f"per-row selection needs a parameter with >= 2 dims, got shape {tuple(shape)}")
    return shape[0], _numel(shape[1:])


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


@dataclass
class Selection:
    """Per parameter name, which entries are trainable; plus what produced them.

    ``total_params`` is the parameter count of the whole model the selection was made on, so that
    the tuned fraction can be reported without the model at hand.
    """

    entries: dict[str, Entries]
    total_params: int
    method: str = "manual"
    hparams: dict = field(default_factory=dict)

    # ---- counting -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __getitem__(self, name: str) -> Entries:
        return self.entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    @property
    def num_trainable(self) -> int:
        return sum(e.count for e in self.entries.values())

    @property
    def fraction(self) -> float:
        """Trainable scalars over all parameters of the model."""
        return self.num_trainable / max(self.total_params, 1)

    def masks(self) -> dict[str, torch.Tensor]:
        """``{param_name: bool mask of the parameter's shape}`` for every parameter with trainable entries."""
        return {name: e.mask() for name, e in self.entries.items()}

    # ---- display --------------------------------------------------------------------------------
    def summary(self) -> str:
        """A per-parameter table and the totals, for logs."""
        head = ("parameter", "shape", "mode", "trainable", "of", "%")
        rows = [
            (name, "x".join(map(str, e.shape)), e.describe(), f"{e.count:,}", f"{e.numel:,}", f"{100 * e.count / max(e.numel, 1):.2f}")
            for name, e in self.entries.items()
        ]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        fmt = lambda r: "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        lines = [f"Selection by {self.method} {json.dumps(self.hparams, sort_keys=True)}", fmt(head), fmt(["-" * w for w in widths])]
        lines += [fmt(r) for r in rows]
        by_layout: dict[str, int] = {}
        for e in self.entries.values():
            by_layout[e.layout] = by_layout.get(e.layout, 0) + e.count
        lines.append("by layout: " + ", ".join(f"{k} {v:,}" for k, v in by_layout.items()))
        lines.append(
            f"trainable {self.num_trainable:,} of {self.total_params:,} parameters "
            f"({100 * self.fraction:.3f} %) in {len(self.entries)} tensors"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        return f"Selection(method={self.method!r}, tensors={len(self.entries)}, trainable={self.num_trainable}, fraction={self.fraction:.5f})"

    # ---- checks ---------------------------------------------------------------------------------
    def check_model(self, params: Mapping[str, torch.Tensor], what: str = "the model") -> None:
        """Raise if the selection names a parameter ``params`` lacks or one of another shape."""
        missing = [n for n in self.entries if n not in params]
        if missing:
            raise KeyError(
                f"selection names {len(missing)} parameter(s) that {what} does not have, e.g. {missing[:5]}; "
                f"was it made on another model (or a wrapped one, whose names carry a prefix)?"
            )
        wrong = [
            f"{n}: selection {e.shape} vs model {tuple(params[n].shape)}"
            for n, e in self.entries.items()
            if tuple(params[n].shape) != e.shape
        ]
        if wrong:
            raise ValueError(f"selection and {what} disagree on parameter shapes: {wrong[:5]}")

    def digest(self) -> str:
        """A SHA-256 of everything that defines the selection (method, settings, layouts, indices):
        equal digests on two ranks or two runs mean the same entries are trained."""
        h = hashlib.sha256(json.dumps({"method": self.method, "hparams": self.hparams, "total": self.total_params}, sort_keys=True, default=str).encode())
        for name in sorted(self.entries):
            e = self.entries[name]
            h.update(json.dumps([name, entry_meta(e)], sort_keys=True).encode())
            if e.index is not None:
                h.update(e.index.to(torch.int64).contiguous().numpy().tobytes())
        return h.hexdigest()

    # ---- persistence ----------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write one ``.safetensors`` file: index tensors, plus the layout, method and hyperparameters as JSON metadata."""
        tensors = {f"{n}.index": smallest_int(e.index) for n, e in self.entries.items() if e.index is not None}
        meta = {
            "format": "medseg_peft.selection",
            "version": FORMAT_VERSION,
            "method": self.method,
            "hparams": self.hparams,
            "total_params": self.total_params,
            "entries": {n: entry_meta(e) for n, e in self.entries.items()},
        }
        return atomic_save_safetensors(tensors, path, {"medseg_peft": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path) -> "Selection":
        meta, tensors = read_safetensors_with_meta(path, expected_format="medseg_peft.selection")
        entries = {n: entries_from_meta(n, d, tensors) for n, d in meta["entries"].items()}
        return cls(entries, int(meta["total_params"]), meta.get("method", "manual"), meta.get("hparams", {}))


def entry_meta(e: Entries) -> dict:
    """The JSON part of an entry (its index, if any, is stored as a tensor beside it)."""
    meta = {"layout": e.layout, "shape": list(e.shape)}
    if e.rank is not None:
        meta["rank"] = e.rank
    if e.blocks is not None:
        meta["blocks"] = [list(b) for b in e.blocks]
    if e.on_input:
        meta["on_input"] = True
    return meta


def entries_from_meta(name: str, meta: dict, tensors: dict[str, torch.Tensor]) -> Entries:
    blocks = meta.get("blocks")
    return Entries(meta["layout"], tuple(meta["shape"]), tensors.get(f"{name}.index"), meta.get("rank"),
                   None if blocks is None else tuple(map(tuple, blocks)), bool(meta.get("on_input", False)))


def smallest_int(index: torch.Tensor) -> torch.Tensor:
    """Store an index in the narrowest signed integer type that holds its largest value."""
    top = int(index.max()) if index.numel() else 0
    for dtype in (torch.int8, torch.int16, torch.int32):
        if top <= torch.iinfo(dtype).max:
            return index.to(dtype).contiguous()
    return index.to(torch.int64).contiguous()


def read_safetensors_with_meta(path: str | Path, expected_format: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a file written by this package; raise a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("medseg_peft")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err
    if raw is None:
        raise ValueError(f"{path}: a safetensors file without medseg_peft metadata; expected a {expected_format} file")
    meta = json.loads(raw)
    if meta.get("format") != expected_format:
        raise ValueError(f"{path}: holds a {meta.get('format')!r}, expected a {expected_format!r} file")
    if int(meta.get("version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{path}: format version {meta['version']} is newer than this medseg_peft ({FORMAT_VERSION})")
    return meta, tensors
