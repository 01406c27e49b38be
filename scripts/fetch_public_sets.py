"""Extract small public 2D medical segmentation sets from a git mirror (or an extracted folder) for local benchmarks.

    python scripts/fetch_public_sets.py kvasir SOURCE --out /work/data/kvasir
    python scripts/fetch_public_sets.py kvasir SOURCE --out /work/data/flat/kvasir --kvasir_layout
    python scripts/fetch_public_sets.py busi   SOURCE --out /work/data/busi  [--limit N]
    python scripts/fetch_public_sets.py ph2    SOURCE --out /work/data/ph2
    python scripts/fetch_public_sets.py drive  SOURCE --out /work/data/drive

SOURCE is either a bare git directory (e.g. a mirror brought in with the search tool's ``fetch``) or a folder
that already holds the files (e.g. the official archive, unzipped). From a git directory the files are read with
``git ls-tree`` / ``git cat-file`` at ``--rev``; without ``--rev`` the script takes HEAD, or, when HEAD lacks the
set, the ref or commit whose tree holds the most pairs (some mirrors carry the data only in history or in a pull
request ref). The revision used is written to ``SOURCE.txt`` in the output folder, with the terms below.

Default output is the set's own native layout, files copied byte for byte:
  kvasir  images/<id>.jpg + masks/<id>.jpg
  busi    benign/ and malignant/ with "<class> (N).png" + "<class> (N)_mask.png" (+ "_mask_1.png" ...);
          the "normal" class (empty masks) is skipped unless --busi_classes names it
  ph2     "PH2 Dataset images"/IMDxxx/{IMDxxx_Dermoscopic_Image,IMDxxx_lesion,IMDxxx_roi}/*.bmp + metadata files
  drive   training/{images,1st_manual,mask} + test/{images,1st_manual,2nd_manual,mask}
``--kvasir_layout`` instead writes any set as flat ``images/<id>.png`` (RGB) + ``masks/<id>.png`` (single channel,
0/255; JPEG masks are thresholded at 128, BUSI's several masks of one image are OR-merged, a mask at another size
than its image is nearest-resized to it, DRIVE uses 1st_manual).
``--limit N`` keeps the first N image/mask pairs sorted by name. Only the standard library, numpy and Pillow.

Sources and terms (the data's own terms, not the hosting repository's):

- Kvasir-SEG (1000 colonoscopy polyp images + masks, jpg). Mirror: github.com/hieutt99/show-project-kvasir-keras
  (all 1000 pairs at commit fa19554 under train/val/test; later commits removed them; that copy re-saved every
  image and mask as JPEG quality 95, so files are not byte-identical to the official ones). Terms (Simula): research and
  educational use only, commercial use needs written permission, cite the paper below. The same images and masks
  ship as "segmented-images" in HyperKvasir, released under CC BY 4.0.
  Cite: D. Jha et al., "Kvasir-SEG: A Segmented Polyp Dataset", MultiMedia Modeling (MMM 2020), LNCS 11962,
  pp. 451-462, doi:10.1007/978-3-030-37734-2_37; and for HyperKvasir: H. Borgli et al., Scientific Data 7:283
  (2020), doi:10.1038/s41597-020-00622-y.
- BUSI, Breast Ultrasound Images (437 benign / 210 malignant / 133 normal, PNG). Mirror:
  github.com/yirutsai/Breast-ultrasound-dataset (data/<class>/images + data/<class>/mask: the original files of
  Dataset_BUSI_with_GT, copied unchanged into subfolders). A smaller copy, github.com/mohit-aren/Breast_Cancer
  (dataset/, about 50 per class), resized "benign (1)".."(14)" and their first masks to 416x416, so there
  "benign (4)_mask_1.png" no longer matches its image. Terms: released publicly by the authors for research; cite
  the descriptor article (Data in Brief, open access CC BY 4.0).
  Cite: W. Al-Dhabyani, M. Gomaa, H. Khaled, A. Fahmy, "Dataset of breast ultrasound images", Data in Brief 28
  (2020) 104863, doi:10.1016/j.dib.2019.104863.
- PH2 dermoscopy (200 lesions, BMP, lesion masks + colour-class ROI masks). Mirror:
  github.com/chelseaparlett/SkinCancerVariation (PH2Dataset/). Terms: freely available for research and
  benchmarking; cite the paper. Cite: T. Mendonca, P. M. Ferreira, J. S. Marques, A. R. S. Marcal, J. Rozeira,
  "PH2 - A dermoscopic image database for research and benchmarking", IEEE EMBC 2013, pp. 5437-5440,
  doi:10.1109/EMBC.2013.6610779.
- DRIVE retinal vessels (40 fundus images, TIFF + GIF masks). Terms: research and educational use, free of charge;
  copying, redistribution and unauthorised commercial use prohibited; use restricted to those who obtained the
  database directly from its official site. A copy exists in github.com/orobix/retina-unet (pull request #91 ref,
  not merged), but a third-party copy does not meet those terms, so ``drive`` reads only a folder from an official
  download unless --allow_third_party_drive is given. Cite: J. Staal, M. D. Abramoff, M. Niemeijer,
  M. A. Viergever, B. van Ginneken, "Ridge-based vessel segmentation in color images of the retina", IEEE TMI
  23(4):501-509, 2004, doi:10.1109/TMI.2004.825627.

The data is for local use only: it is never committed to this repository nor redistributed.
"""

from __future__ import annotations

import argparse
import io
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

TERMS = {
    "kvasir": (
        "Kvasir-SEG: research and educational use only; commercial use needs prior written permission (Simula); "
        "cite Jha et al., MMM 2020, doi:10.1007/978-3-030-37734-2_37. Same images/masks are in HyperKvasir "
        "(CC BY 4.0; cite Borgli et al., Sci Data 7:283, 2020, doi:10.1038/s41597-020-00622-y)."
    ),
    "busi": (
        "BUSI: public research dataset; cite Al-Dhabyani et al., Data in Brief 28 (2020) 104863, "
        "doi:10.1016/j.dib.2019.104863."
    ),
    "ph2": (
        "PH2: free for research and benchmarking; cite Mendonca et al., IEEE EMBC 2013, pp. 5437-5440, "
        "doi:10.1109/EMBC.2013.6610779."
    ),
    "drive": (
        "DRIVE: research and educational use, free of charge; copying, redistribution and unauthorised commercial "
        "use prohibited; restricted to those who obtained it from the official site; cite Staal et al., IEEE TMI "
        "23(4):501-509, 2004, doi:10.1109/TMI.2004.825627."
    ),
}


# ----------------------------------------------------------------------------------------------------------- sources


class Source:
    """Read-only view of a file tree: ``names()`` lists relative POSIX paths, ``read(name)`` returns bytes."""

    description = ""

    def names(self) -> list[str]:
        raise NotImplementedError

    def read(self, name: str) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        pass


class DirSource(Source):
    def __init__(self, root: Path):
        self.root = root
        self.description = f"folder {root.resolve()}"

    def names(self) -> list[str]:
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())

    def read(self, name: str) -> bytes:
        return (self.root / name).read_bytes()


def _git(git_dir: Path, *args: str) -> bytes:
    return subprocess.run(["git", f"--git-dir={git_dir}", *args], check=True, capture_output=True).stdout


def git_tree_names(git_dir: Path, rev: str) -> list[str]:
    out = _git(git_dir, "ls-tree", "-r", "-z", "--name-only", rev)
    return sorted(n.decode("utf-8", "surrogateescape") for n in out.split(b"\0") if n)


def git_candidate_revs(git_dir: Path) -> list[str]:
    """HEAD, then every ref, then every commit reachable from any ref (newest first), without repeats."""
    revs = [_git(git_dir, "rev-parse", "HEAD").decode().strip()]
    revs += _git(git_dir, "for-each-ref", "--format=%(objectname)").decode().split()
    revs += _git(git_dir, "rev-list", "--all").decode().split()
    seen: set[str] = set()
    return [r for r in revs if not (r in seen or seen.add(r))]


class GitSource(Source):
    """Files of one commit of a (bare) git repository, read through one ``git cat-file --batch`` process."""

    def __init__(self, git_dir: Path, rev: str):
        self.git_dir = git_dir
        self.rev = _git(git_dir, "rev-parse", f"{rev}^{{commit}}").decode().strip()
        self.description = f"git {git_dir.resolve()} at commit {self.rev}"
        self._names = git_tree_names(git_dir, self.rev)
        self._proc = subprocess.Popen(
            ["git", f"--git-dir={git_dir}", "cat-file", "--batch"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )

    def names(self) -> list[str]:
        return self._names

    def read(self, name: str) -> bytes:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(f"{self.rev}:{name}\n".encode("utf-8", "surrogateescape"))
        self._proc.stdin.flush()
        header = self._proc.stdout.readline().decode().split()
        if len(header) != 3 or header[1] != "blob":
            raise FileNotFoundError(f"{name} not readable at {self.rev}: {' '.join(header)}")
        data = self._proc.stdout.read(int(header[2]))
        self._proc.stdout.read(1)  # the newline after each object
        return data

    def close(self) -> None:
        if self._proc.poll() is None:
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            self._proc.wait()


def is_git_dir(path: Path) -> bool:
    return (path / "HEAD").is_file() and (path / "objects").is_dir()


def open_source(path: Path, rev: str | None, count_pairs) -> Source:
    """A folder as is; a git dir at ``rev``, or at HEAD, or at the ref/commit holding the most pairs."""
    if not is_git_dir(path):
        if not path.is_dir():
            sys.exit(f"{path}: neither a git directory nor a folder")
        return DirSource(path)
    if rev is not None:
        return GitSource(path, rev)
    best_rev, best = None, 0
    for i, cand in enumerate(git_candidate_revs(path)):
        n = count_pairs(git_tree_names(path, cand))
        if n > best:
            best_rev, best = cand, n
        if i == 0 and n > 0:  # HEAD has the set: take it
            break
    if best_rev is None:
        sys.exit(f"{path}: no revision holds this data set")
    return GitSource(path, best_rev)


# ------------------------------------------------------------------------------------------------------------ pairs


@dataclass
class Pair:
    """One image with its mask file(s); ``native`` maps source paths to output paths for the native layout."""

    key: str  # sort key and flat file stem
    image: str
    masks: list[str]
    native: dict[str, str] = field(default_factory=dict)


def _natural(s: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


KVASIR_RE = re.compile(r"^(?P<pre>(?:.*/)?)(?P<kind>images|masks)/(?P<id>[^/]+)\.(?P<ext>jpe?g|png)$", re.I)


def kvasir_pairs(names: list[str]) -> list[Pair]:
    found: dict[tuple[str, str], dict[str, str]] = {}
    for n in names:
        m = KVASIR_RE.match(n)
        if m:
            found.setdefault((m["pre"], m["id"]), {})[m["kind"].lower()] = n
    pairs: dict[str, Pair] = {}
    for (_, ident), kinds in sorted(found.items()):
        if "images" in kinds and "masks" in kinds and ident not in pairs:
            img, msk = kinds["images"], kinds["masks"]
            pairs[ident] = Pair(
                ident, img, [msk],
                {img: f"images/{ident}{Path(img).suffix.lower()}", msk: f"masks/{ident}{Path(msk).suffix.lower()}"},
            )
    return [pairs[k] for k in sorted(pairs)]


BUSI_RE = re.compile(
    r"^(?P<pre>(?:.*/)?)(?P<cls>benign|malignant|normal)/(?:(?:images|masks?)/)?"
    r"(?P=cls) \((?P<n>\d+)\)(?P<mask>_mask(?:_\d+)?)?\.png$"
)


def busi_pairs(names: list[str], classes: tuple[str, ...] = ("benign", "malignant")) -> list[Pair]:
    """Pairs from ``<class>/<class> (N).png`` + ``<class> (N)_mask[_k].png`` (also with images/ and mask/ subfolders,
    as some copies keep them); where a tree holds several such roots, the one with the most pairs wins."""
    items: dict[str, dict[tuple[str, int], dict]] = {}
    for n in names:
        m = BUSI_RE.match(n)
        if not m or m["cls"] not in classes:
            continue
        entry = items.setdefault(m["pre"], {}).setdefault((m["cls"], int(m["n"])), {"image": None, "masks": []})
        if m["mask"]:
            entry["masks"].append(n)
        else:
            entry["image"] = n
    by_root: list[list[Pair]] = []
    for root_items in items.values():
        pairs = []
        for (cls, num), entry in sorted(root_items.items(), key=lambda kv: (classes.index(kv[0][0]), kv[0][1])):
            if entry["image"] is None or not entry["masks"]:
                continue
            masks = sorted(entry["masks"], key=_natural)
            native = {p: f"{cls}/{Path(p).name}" for p in [entry["image"], *masks]}
            pairs.append(Pair(f"{cls}_{num:04d}", entry["image"], masks, native))
        by_root.append(pairs)
    return max(by_root, key=len) if by_root else []


PH2_RE = re.compile(
    r"^(?P<pre>(?:.*/)?)PH2 Dataset images/(?P<id>IMD\d{3})/"
    r"(?P=id)_(?P<kind>Dermoscopic_Image|lesion|roi)/(?P<file>[^/]+\.bmp)$"
)
PH2_META = ("PH2_dataset.txt", "PH2_dataset.xlsx", "Readme.txt")


def ph2_pairs(names: list[str]) -> list[Pair]:
    cases: dict[str, dict] = {}
    for n in names:
        m = PH2_RE.match(n)
        if not m:
            continue
        c = cases.setdefault(m["id"], {"image": None, "lesion": None, "roi": [], "pre": m["pre"]})
        if m["kind"] == "Dermoscopic_Image" and m["file"] == f"{m['id']}.bmp":
            c["image"] = n
        elif m["kind"] == "lesion" and m["file"] == f"{m['id']}_lesion.bmp":
            c["lesion"] = n
        elif m["kind"] == "roi":
            c["roi"].append(n)
    pairs = []
    for ident in sorted(cases):
        c = cases[ident]
        if c["image"] is None or c["lesion"] is None:
            continue
        native = {p: p[len(c["pre"]):] for p in [c["image"], c["lesion"], *sorted(c["roi"])]}
        pairs.append(Pair(ident, c["image"], [c["lesion"]], native))
    return pairs


def ph2_meta_files(names: list[str], pairs: list[Pair]) -> dict[str, str]:
    if not pairs:
        return {}
    pre = pairs[0].image[: pairs[0].image.index("PH2 Dataset images/")]
    return {pre + f: f for f in PH2_META if pre + f in names}


DRIVE_IMG_RE = re.compile(r"^(?P<pre>(?:.*/)?)(?P<split>training|test)/images/(?P<n>\d+)_(?P=split)\.tif$")


def drive_pairs(names: list[str]) -> list[Pair]:
    name_set = set(names)
    by_prefix: dict[str, list[Pair]] = {}
    for n in names:
        m = DRIVE_IMG_RE.match(n)
        if not m:
            continue
        pre, split, num = m["pre"], m["split"], m["n"]
        manual = f"{pre}{split}/1st_manual/{num}_manual1.gif"
        if manual not in name_set:
            continue
        extras = [f"{pre}{split}/mask/{num}_{split}_mask.gif"]
        if split == "test":
            extras.append(f"{pre}test/2nd_manual/{num}_manual2.gif")
        native = {p: p[len(pre):] for p in [n, manual, *extras] if p in name_set}
        by_prefix.setdefault(pre, []).append(Pair(f"{num}_{split}", n, [manual], native))
    if not by_prefix:
        return []
    best = max(by_prefix.values(), key=len)
    return sorted(best, key=lambda p: Path(p.image).name)


# ----------------------------------------------------------------------------------------------------------- writing


def _image(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def binary_mask(datas: list[bytes], size: tuple[int, int]) -> np.ndarray:
    """OR of the given mask files, each taken to one channel (nearest-resized to ``size`` = (W, H) where it
    differs) and thresholded at 128: uint8 0/255."""
    out = np.zeros((size[1], size[0]), dtype=bool)
    for d in datas:
        m = _image(d).convert("L")
        if m.size != size:
            m = m.resize(size, Image.NEAREST)
        out |= np.asarray(m) >= 128
    return out.astype(np.uint8) * 255


@dataclass
class Stats:
    sizes: list[tuple[int, int]] = field(default_factory=list)
    mask_values: set = field(default_factory=set)
    fg: list[float] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    non_binary: list[str] = field(default_factory=list)

    def report(self, n_written: int) -> str:
        ws = sorted({w for w, _ in self.sizes})
        hs = sorted({h for _, h in self.sizes})
        lines = [
            f"pairs written: {n_written}",
            f"image sizes (WxH): {len(set(self.sizes))} distinct, width {ws[0]}-{ws[-1]}, height {hs[0]}-{hs[-1]}"
            if self.sizes else "image sizes: none",
            f"mask values before binarising: min {min(self.mask_values)} max {max(self.mask_values)}, "
            f"{len(self.mask_values)} distinct" if self.mask_values else "mask values: none",
            f"foreground fraction: mean {np.mean(self.fg):.3f} min {np.min(self.fg):.3f} max {np.max(self.fg):.3f}"
            if self.fg else "foreground fraction: none",
        ]
        if self.non_binary:
            lines.append(f"masks with values other than 0/255 (e.g. JPEG): {len(self.non_binary)}")
        if self.empty:
            lines.append(f"empty masks: {len(self.empty)} ({', '.join(self.empty[:5])})")
        if self.mismatched:
            lines.append(f"mask file at another size than its image (nearest-resized in the flat layout, copied "
                         f"as is in the native one): {', '.join(self.mismatched)}")
        return "\n".join(lines)


def check_pair(src: Source, pair: Pair, stats: Stats) -> tuple[Image.Image, np.ndarray, list[bytes]]:
    img = _image(src.read(pair.image))
    mask_bytes = [src.read(m) for m in pair.masks]
    for b in mask_bytes:
        raw = np.asarray(_image(b).convert("L"))
        vals = np.unique(raw)
        stats.mask_values.update(int(v) for v in vals)
        if not set(vals.tolist()) <= {0, 255}:
            if pair.key not in stats.non_binary:
                stats.non_binary.append(pair.key)
        if raw.shape != (img.height, img.width):
            if pair.key not in stats.mismatched:
                stats.mismatched.append(pair.key)
    mask = binary_mask(mask_bytes, img.size)
    stats.sizes.append(img.size)
    frac = float((mask > 0).mean())
    stats.fg.append(frac)
    if frac == 0.0:
        stats.empty.append(pair.key)
    return img, mask, mask_bytes


def write_set(src: Source, pairs: list[Pair], out: Path, flat: bool, extra_native: dict[str, str]) -> Stats:
    stats = Stats()
    written = 0
    if flat:
        (out / "images").mkdir(parents=True)
        (out / "masks").mkdir(parents=True)
    for pair in pairs:
        img, mask, _ = check_pair(src, pair, stats)
        if flat:
            img.convert("RGB").save(out / "images" / f"{pair.key}.png")
            Image.fromarray(mask, mode="L").save(out / "masks" / f"{pair.key}.png")
        else:
            for src_path, rel in pair.native.items():
                dst = out / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(src.read(src_path))
        written += 1
    if not flat:
        for src_path, rel in extra_native.items():
            (out / rel).write_bytes(src.read(src_path))
    print(stats.report(written))
    return stats


# -------------------------------------------------------------------------------------------------------------- main

FINDERS = {"kvasir": kvasir_pairs, "busi": busi_pairs, "ph2": ph2_pairs, "drive": drive_pairs}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dataset", choices=sorted(FINDERS))
    ap.add_argument("source", type=Path, help="bare git directory of a mirror, or a folder holding the files")
    ap.add_argument("--out", type=Path, required=True, help="output folder (must not exist unless --overwrite)")
    ap.add_argument("--rev", default=None, help="git revision to read (default: HEAD, else the richest ref/commit)")
    ap.add_argument("--limit", type=int, default=None, help="keep the first N pairs, sorted by name")
    ap.add_argument("--kvasir_layout", action="store_true",
                    help="write flat images/<id>.png + masks/<id>.png (0/255, one channel) "
                         "instead of the native layout")
    ap.add_argument("--busi_classes", default="benign,malignant",
                    help="BUSI classes to keep, comma separated (normal has empty masks)")
    ap.add_argument("--allow_third_party_drive", action="store_true",
                    help="read DRIVE from a git mirror; DRIVE's terms restrict use to copies "
                         "obtained from the official site")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = ap.parse_args(argv)

    if args.dataset == "drive" and is_git_dir(args.source) and not args.allow_third_party_drive:
        sys.exit("DRIVE's terms restrict its use to those who obtained it from the official site and forbid "
                 "redistribution; point SOURCE at the folder of an official download, or pass "
                 "--allow_third_party_drive if you hold it under those terms.")

    if args.dataset == "busi":
        classes = tuple(c.strip() for c in args.busi_classes.split(",") if c.strip())
        find = lambda names: busi_pairs(names, classes)  # noqa: E731
    else:
        find = FINDERS[args.dataset]

    if args.out.exists():
        if not args.overwrite:
            sys.exit(f"{args.out} exists; pass --overwrite to replace it")
        shutil.rmtree(args.out)

    src = open_source(args.source, args.rev, lambda names: len(find(names)))
    try:
        names = src.names()
        pairs = find(names)
        if not pairs:
            sys.exit(f"no {args.dataset} image/mask pairs in {src.description}")
        found = len(pairs)
        if args.limit is not None:
            pairs = pairs[: args.limit]
        extra = ph2_meta_files(names, pairs) if args.dataset == "ph2" else {}
        print(f"{args.dataset}: {found} pairs in {src.description}; writing {len(pairs)} to {args.out}"
              f" ({'flat images/ + masks/' if args.kvasir_layout else 'native layout'})")
        args.out.mkdir(parents=True)
        write_set(src, pairs, args.out, args.kvasir_layout, extra)
        (args.out / "SOURCE.txt").write_text(
            f"dataset: {args.dataset}\nsource: {src.description}\npairs: {len(pairs)} of {found}\n"
            f"layout: {'flat images/ + masks/ (0/255 PNG)' if args.kvasir_layout else 'native'}\n"
            f"terms: {TERMS[args.dataset]}\nLocal use only: never commit or redistribute these files.\n"
        )
    finally:
        src.close()


if __name__ == "__main__":
    main()
