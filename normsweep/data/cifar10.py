"""CIFAR-10 (``data=cifar10``, the study's dataset), in either layout, detected from what ``data.root`` holds:

* ``pickle``: ``ROOT/cifar-10-batches-py/{data_batch_1..5,test_batch}``, torchvision's download of
  the original release (downloaded and checksum-verified by torchvision when ``data.download``);
* ``folder``: ``ROOT/train/<class>/*.png|jpg`` and ``ROOT/test/<class>/...``, classes in
  alphabetical order (which is CIFAR-10's label order for its usual class names).

Its mean and std are CIFAR-10's published constants (:data:`MEAN`, :data:`STD`), so every run's
numbers are those of the study.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from normsweep.data.dataset import DataError, DataInfo, Prepared, RawData, Request, Source, image_bytes
from normsweep.data.images import class_files, decode_files, same_classes
from normsweep.data.unpickle import load_pickle

log = logging.getLogger(__name__)

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
PICKLE_DIR = "cifar-10-batches-py"

HOW_TO_GET = (
    "expected ROOT/cifar-10-batches-py/ (torchvision's CIFAR-10) or ROOT/train/<class>/*.jpg|png "
    "and ROOT/test/<class>/...; pass data.root=PATH to a folder that has one, or data.download=true "
    "to download the original CIFAR-10 into data.root"
)


def info(classes: tuple[str, ...] = CLASSES) -> DataInfo:
    return DataInfo("cifar10", classes, 32, MEAN, STD)


def detect_format(root: Path, fmt: str = "auto") -> str:
    """``pickle`` or ``folder``: the layout ``root`` holds (or ``fmt`` if given and present)."""
    has_pickle = (root / PICKLE_DIR).is_dir()
    has_folder = (root / "train").is_dir()
    if fmt == "pickle" and has_pickle or fmt == "folder" and has_folder:
        return fmt
    if fmt == "auto" and (has_pickle or has_folder):
        return "pickle" if has_pickle else "folder"
    raise DataError(f"data.root={root} has {_wanted(fmt)} (it {found_in(root)}); {HOW_TO_GET}")


def _wanted(fmt: str) -> str:
    return {"auto": "no 'cifar-10-batches-py/' or 'train/'", "pickle": "no 'cifar-10-batches-py/'",
            "folder": "no 'train/'"}[fmt]  # fmt: skip


def found_in(root: Path) -> str:
    """What ``root`` holds, for an error message: 'does not exist', 'is empty', 'holds [...]'."""
    if not root.exists():
        return "does not exist"
    entries = sorted(p.name for p in root.iterdir())[:8]
    return f"holds {entries}" if entries else "is empty"


def download(root: Path, dataset: str = "CIFAR10", name: str = "CIFAR-10", **kwargs) -> None:
    """torchvision's download of ``dataset`` into ``root``, with its MD5 check."""
    import torchvision.datasets

    log.info("downloading %s into %s", name, root)
    try:
        getattr(torchvision.datasets, dataset)(str(root), download=True, **kwargs)
    except Exception as e:  # no network, proxy, disk full: say what and how to go on
        raise DataError(
            f"could not download {name} into data.root={root}: {type(e).__name__}: {e}; "
            f"download it elsewhere, or pass data.root=PATH to a copy you have"
        ) from e


def download_pickle(root: Path) -> None:
    """torchvision's download of the original CIFAR-10, with its MD5 check."""
    download(root, "CIFAR10", "CIFAR-10", train=True)


def _unpickle(path: Path) -> dict:
    try:
        batch = load_pickle(path)
        x = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(batch["labels"], dtype=np.int64)
    except FileNotFoundError:
        raise DataError(
            f"{path} is missing; a cifar-10-batches-py folder needs data_batch_1..5 and test_batch"
        ) from None
    except DataError:
        raise
    except Exception as e:
        raise DataError(
            f"{path} is not a readable CIFAR-10 batch ({type(e).__name__}: {e}); "
            f"delete the folder and download it again (data.download=true)"
        ) from e
    if len(x) != len(y):
        raise DataError(f"{path} has {len(x)} images but {len(y)} labels")
    return {"x": x, "y": y}


def read_pickle(root: Path) -> RawData:
    folder = root / PICKLE_DIR
    train = [_unpickle(folder / f"data_batch_{i}") for i in range(1, 6)]
    test = _unpickle(folder / "test_batch")
    classes = _read_meta(folder / "batches.meta", max(int(b["y"].max(initial=0)) for b in [*train, test]))
    return RawData(
        torch.from_numpy(np.concatenate([b["x"] for b in train])),
        torch.from_numpy(np.concatenate([b["y"] for b in train])),
        torch.from_numpy(test["x"]),
        torch.from_numpy(test["y"]),
        info(classes),
    )


def _read_meta(path: Path, max_label: int) -> tuple[str, ...]:
    """The class names in ``batches.meta`` (CIFAR-10's own order), or :data:`CLASSES` without one."""
    if not path.exists():
        return CLASSES
    try:
        names = load_pickle(path)["label_names"]
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path} is not a readable CIFAR-10 batches.meta ({type(e).__name__}: {e}); "
                        f"delete the folder and download it again (data.download=true)") from e  # fmt: skip
    names = [n.decode() if isinstance(n, bytes) else n for n in names]
    if not all(isinstance(n, str) for n in names) or len(names) <= max_label:
        raise DataError(f"{path}: label_names {names!r} do not name labels 0..{max_label}")
    return tuple(names)


def folder_files(root: Path) -> dict[str, dict[str, list[Path]]]:
    """``{"train": {class: files}, "test": {...}}`` of a class-folder layout, checked."""
    train = class_files(root / "train")
    if not (root / "test").is_dir():
        raise DataError(f"data.root={root} has 'train/' but no 'test/'; {HOW_TO_GET}")
    splits = {"train": train, "test": class_files(root / "test")}
    same_classes(root, splits)
    return splits


def labelled(files: dict[str, list[Path]], classes: tuple[str, ...]) -> tuple[list[Path], torch.Tensor]:
    paths = [p for c in classes for p in files[c]]
    labels = torch.tensor([k for k, c in enumerate(classes) for _ in files[c]], dtype=torch.int64)
    return paths, labels


def to_nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def read_folder(root: Path, files: dict[str, dict[str, list[Path]]] | None = None) -> RawData:
    files = files or folder_files(root)
    classes = tuple(sorted(files["train"]))
    log.info("decoding the images under %s once (cached for later runs)", root)
    out = []
    for split in ("train", "test"):
        paths, labels = labelled(files[split], classes)
        out += [
            to_nchw(
                decode_files(
                    paths,
                    32,
                    resize=False,
                    mismatch="CIFAR-10 images are 32x32 (other images: data=folder data.image_size=N)",
                )
            ),
            labels,
        ]
    return RawData(*out, info(classes))


def prepare(req: Request) -> Prepared:
    root = req.root
    try:
        fmt = detect_format(root, req.format)
    except DataError:
        if not (req.download and req.format in ("auto", "pickle")):
            raise
        download_pickle(root)
        fmt = detect_format(root, "pickle")
    if fmt == "pickle":
        return Prepared("pickle", [root / PICKLE_DIR], image_bytes(60000, 32), lambda: read_pickle(root))
    files = folder_files(root)
    n = sum(len(f) for split in files.values() for f in split.values())
    return Prepared("folder", [root], image_bytes(n, 32), lambda: read_folder(root, files))


SOURCE = Source(prepare, options={}, formats=("auto", "pickle", "folder"), doc="CIFAR-10, pickle or class folders")
