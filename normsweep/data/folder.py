"""Any class-folder dataset (``data=folder data.root=PATH``)::

    PATH/train/<class>/<image>   the training images, one folder per class (2 classes or more)
    PATH/test/<class>/<image>    the test images, the same class folders
    PATH/val/<class>/<image>     optional: the validation split (else it is carved from train/)

Classes are the folder names in sorted order. Images are any file Pillow reads (JPEG, PNG, BMP,
GIF, TIFF, WebP, ...), converted to RGB. With ``data.image_size=N`` every image's shorter side is
resized to N and the centre NxN square kept (at decode time, once); with ``data.image_size=null``
all images must be square and of one size, used as they are.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from normsweep.data.cifar10 import found_in, labelled, to_nchw
from normsweep.data.dataset import UNKNOWN_STATS, DataError, DataInfo, Prepared, RawData, Request, Source, image_bytes
from normsweep.data.images import class_files, decode_files, image_size_of, same_classes

log = logging.getLogger(__name__)

LAYOUT = "expected PATH/train/<class>/*.jpg|png, PATH/test/<class>/... and optionally PATH/val/<class>/..."


def files_of(root: Path) -> dict[str, dict[str, list[Path]]]:
    """``{"train": {class: files}, "test": ..., ["val": ...]}``, checked: 2 classes or more, the same in each."""
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise DataError(f"data.root={root} has no '{split}/' (it {found_in(root)}); {LAYOUT}; "
                            f"pass data.root=PATH to such a folder")  # fmt: skip
    splits = {s: class_files(root / s) for s in ("train", "val", "test") if (root / s).is_dir()}
    if len(splits["train"]) < 2:
        raise DataError(f"{root / 'train'} has one class folder only ({list(splits['train'])}); a classifier needs "
                        f"2 classes or more: add a folder per class under train/ and test/")  # fmt: skip
    same_classes(root, splits)
    return splits


def size_of(splits: dict[str, dict[str, list[Path]]], image_size: int | None) -> int:
    if image_size is not None:
        return image_size
    first = next(iter(splits["train"].values()))[0]
    w, h = image_size_of(first)
    if w != h:
        raise DataError(f"{first} is {w}x{h} pixels, not square; pass data.image_size=N to resize every image's "
                        f"shorter side to N and keep the centre NxN square")  # fmt: skip
    return w


def read(root: Path, splits: dict[str, dict[str, list[Path]]], size: int, resize: bool) -> RawData:
    classes = tuple(sorted(splits["train"]))
    first = next(iter(splits["train"].values()))[0]
    mismatch = (f"the first training image, {first}, is {size}x{size}: images of other sizes need "
                f"data.image_size=N (shorter side resized to N, centre NxN square kept)")  # fmt: skip
    n = sum(len(f) for s in splits.values() for f in s.values())
    log.info("decoding the %s images under %s once, at %dx%d (cached for later runs)", f"{n:,}", root, size, size)
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, files in splits.items():
        paths, labels = labelled(files, classes)
        out[name] = to_nchw(decode_files(paths, size, resize, mismatch)), labels
    val = out.get("val", (None, None))
    return RawData(*out["train"], *out["test"], DataInfo("folder", classes, size, UNKNOWN_STATS, UNKNOWN_STATS), *val)


def prepare(req: Request) -> Prepared:
    root = req.root
    splits = files_of(root)
    size = size_of(splits, req.image_size)
    n = sum(len(f) for s in splits.values() for f in s.values())
    variant = f"{size}px" if req.image_size is not None else "native"
    return Prepared(variant, [root], image_bytes(n, size), lambda: read(root, splits, size, req.image_size is not None))


SOURCE = Source(prepare, options={"image_size": False}, doc="class folders: train/, test/, optional val/")
