"""ImageNet on disk: every layout gives each image its index in the standard 1,000-class order, and ``--subset-list``.

The canonical order is the sorted wnids, what torchvision and timm models output; timm ships the list
(``timm.data.ImageNetInfo``), so nothing is downloaded. A folder holding only some classes keeps those indices (a
100-class ``val/`` gives labels in 0..999, not 0..99), so a 1,000-class model is scored against the right labels.

Layouts read (split ``val``; ``train`` reads the class-folder ones):

- ``ROOT/val/<wnid>/*.JPEG``, all or some classes; torchvision's ``ImageNet(ROOT, split="val")`` root is this plus
  ``meta.bin``; ``ROOT`` may also be the ``val`` folder itself.
- a flat folder of ``ILSVRC2012_val_XXXXXXXX.JPEG`` (``ROOT/ILSVRC2012_img_val``, ``ROOT/val``, Kaggle's
  ``ROOT/ILSVRC/Data/CLS-LOC/val`` or ``ROOT``) labelled by Kaggle's ``LOC_val_solution.csv`` (first token of
  PredictionString is the wnid) or by the devkit's ``data/ILSVRC2012_validation_ground_truth.txt`` (line i: the
  1-based ILSVRC2012_ID of image i) with ``data/meta.mat`` beside it (ID -> wnid; read with scipy as torchvision does).
"""

from __future__ import annotations

import csv
import functools
import re
from pathlib import Path

from robust_enc.errors import UserError

NUM_CLASSES = 1000
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
LOC_SOLUTION = "LOC_val_solution.csv"
DEVKIT_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})$")  # the number is the line of the devkit's ground-truth file
WNID = re.compile(r"n\d{8}$")

Samples = list[tuple[str, int]]  # (image path, canonical class index)


@functools.cache
def canonical_wnids() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k wnids in the standard (sorted) order."""
    from timm.data import ImageNetInfo

    wnids = tuple(ImageNetInfo().label_names())
    assert len(wnids) == NUM_CLASSES and list(wnids) == sorted(wnids), "timm's ImageNet-1k synset list changed"
    return wnids


@functools.cache
def wnid_index() -> dict[str, int]:
    return {w: i for i, w in enumerate(canonical_wnids())}


@functools.cache
def class_names() -> tuple[str, ...]:
    """The first lemma of each class ("tench", "goldfish", ...), in the canonical order."""
    from timm.data import ImageNetInfo

    return tuple(d.split(",")[0] for d in ImageNetInfo().label_descriptions())


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _class_folders(root: Path) -> Samples | None:
    """Samples of ``root/<wnid>/*`` (sorted by wnid, then file name, as ImageFolder), or None if ``root`` holds no
    class folder. Folders that are not ImageNet-1k wnids are a UserError: they would get no canonical label."""
    if not root.is_dir():
        return None
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        return None
    index = wnid_index()
    foreign = [p.name for p in folders if p.name not in index]
    if foreign:
        raise UserError(f"{root} has class folders that are not ImageNet-1k wnids (e.g. {foreign[0]!r}, "
                        f"{len(foreign)} of {len(folders)}): name them by wnid (n01440764, ...), or use "
                        f"--dataset folder:{root.parent if root.name in ('train', 'val') else root} for other classes")
    return [(str(path), index[folder.name]) for folder in folders for path in _images_in(folder)]


def _solution_csv(path: Path) -> dict[str, str]:
    """Kaggle's LOC_val_solution.csv: image id -> wnid (the first token of PredictionString)."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"ImageId", "PredictionString"} <= set(rows[0]):
        raise UserError(f"{path} is not Kaggle's LOC_val_solution.csv (want columns ImageId,PredictionString)")
    return {row["ImageId"]: row["PredictionString"].split()[0] for row in rows if row["PredictionString"].strip()}


def _devkit_labels(truth: Path) -> dict[int, str]:
    """The devkit's ground truth: image number (1-based) -> wnid, through meta.mat's ILSVRC2012_ID -> WNID."""
    import scipy.io

    meta = truth.parent / "meta.mat"
    if not meta.is_file():
        raise UserError(f"{truth} needs the devkit's meta.mat beside it (maps ILSVRC2012_ID to wnid): copy "
                        "ILSVRC2012_devkit_t12/data/meta.mat there")
    synsets = scipy.io.loadmat(str(meta), squeeze_me=True)["synsets"]
    # The leaves of the synset tree (num_children == 0) are the 1,000 classes, as torchvision's parse_meta_mat reads.
    id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    ids = [int(line) for line in truth.read_text().split()]
    unknown = sorted(set(ids) - set(id_to_wnid))
    if unknown:
        raise UserError(f"{truth} has ILSVRC2012_ID {unknown[0]} that {meta} does not define")
    return {number: id_to_wnid[i] for number, i in enumerate(ids, start=1)}


def _flat_samples(folder: Path, labels: dict[str, str] | dict[int, str], source: Path) -> Samples:
    index = wnid_index()
    samples = []
    for path in _images_in(folder):
        key: str | int = path.stem
        if labels and isinstance(next(iter(labels)), int):  # the devkit numbers the images
            match = VAL_NAME.match(path.stem)
            key = int(match.group(1)) if match else -1
        wnid = labels.get(key)  # type: ignore[call-overload]
        if wnid is None:
            raise UserError(f"{path.name} has no label in {source}: remove it or give the matching label file")
        if wnid not in index:
            raise UserError(f"{source} labels {path.name} {wnid!r}, not an ImageNet-1k wnid")
        samples.append((str(path), index[wnid]))
    return samples


def _flat(root: Path, split: str) -> tuple[str, Samples] | None:
    if split != "val":
        return None
    folders = [root / "ILSVRC2012_img_val", root / "val", root / "ILSVRC" / "Data" / "CLS-LOC" / "val", root]
    folder = next((f for f in folders if f.is_dir() and _images_in(f)), None)
    if folder is None:
        return None
    for place in (root, folder, folder.parent, root.parent):
        if (place / LOC_SOLUTION).is_file():
            return f"flat {folder.name}/ + {LOC_SOLUTION}", _flat_samples(folder, _solution_csv(place / LOC_SOLUTION),
                                                                         place / LOC_SOLUTION)
    for place in (root / "ILSVRC2012_devkit_t12" / "data", root / "data", root, folder.parent / "ILSVRC2012_devkit_t12"
                  / "data"):
        if (place / DEVKIT_TRUTH).is_file():
            return f"flat {folder.name}/ + devkit", _flat_samples(folder, _devkit_labels(place / DEVKIT_TRUTH),
                                                                 place / DEVKIT_TRUTH)
    raise UserError(f"{folder} holds images but no labels: put Kaggle's {LOC_SOLUTION} in {root}, or the devkit's "
                    f"ILSVRC2012_devkit_t12/data/{DEVKIT_TRUTH} with meta.mat beside it")


def find_samples(root: Path, split: str) -> tuple[str, Samples]:
    """(layout name, samples with canonical labels) of the ``split`` images under ``root``; UserError if no layout
    fits (one line naming what was looked for)."""
    if (samples := _class_folders(root / split)) is not None:
        return ("torchvision ImageNet root" if (root / "meta.bin").is_file() else f"{split}/<wnid>/"), samples
    flat = _flat(root, split)
    if flat is not None:
        return flat
    # --data-dir is the val folder itself (only when its folders look like wnids: not a root with train/ only)
    if split == "val" and any(WNID.match(p.name) for p in root.iterdir() if p.is_dir()):
        return "<wnid>/", _class_folders(root) or []
    looked = f"{root}/{split}/<wnid>/*.JPEG"
    if split == "val":
        looked += (f", {root}/<wnid>/, and a flat ILSVRC2012_img_val/ or val/ of JPEGs with {LOC_SOLUTION} or the "
                   f"devkit's {DEVKIT_TRUTH}")
    raise UserError(f"no ImageNet {split} images under {root}: looked for {looked}")


def select_listed(samples: Samples, list_file: str | Path) -> Samples:
    """The samples named in ``list_file`` (one image per line, e.g. RobustBench's 5,000-image list), in the file's
    order. A line with folders (``n01440764/x.JPEG``, ``b/0000.bmp``) matches the file whose path ends with those
    parts; a bare file name matches by name, and must then name one file only."""
    path = Path(list_file)
    try:
        lines = [line.strip() for line in path.read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read --subset-list {path}: {err}") from None
    entries = [tuple(part for part in Path(line.replace("\\", "/")).parts if part not in (".", "/"))
               for line in lines if line and not line.startswith("#")]
    if not entries:
        raise UserError(f"--subset-list {path} names no image (one file name per line)")
    by_name: dict[str, list[tuple[tuple[str, ...], tuple[str, int]]]] = {}
    for sample in samples:
        parts = Path(sample[0]).parts
        by_name.setdefault(parts[-1], []).append((parts, sample))
    chosen, missing = [], []
    for entry in entries:
        found = [sample for parts, sample in by_name.get(entry[-1], []) if parts[-len(entry):] == entry]
        if not found:
            missing.append("/".join(entry))
        elif len(found) > 1:
            raise UserError(f"--subset-list {path}: {'/'.join(entry)!r} matches {len(found)} images ({found[0][0]}, "
                            f"{found[1][0]}, ...): write its folder too, e.g. {Path(found[0][0]).parent.name}/"
                            f"{entry[-1]}")
        else:
            chosen.append(found[0])
    if missing:
        raise UserError(f"{len(missing)} of the {len(entries)} images in --subset-list {path} are not in the data "
                        f"set (first: {missing[0]}): check the list against --data-dir")
    return chosen
