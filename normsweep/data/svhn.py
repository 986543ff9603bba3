"""SVHN (``data=svhn``): ``ROOT/train_32x32.mat`` and ``ROOT/test_32x32.mat`` (and ``extra_32x32.mat``, added to
the training images with ``data.extra=true``), the cropped-digits release as torchvision downloads it
(checksum-verified, when ``data.download`` and absent). Each file holds ``X`` (32x32x3xN uint8) and
``y`` (Nx1, 1..10, where 10 is the digit 0: label 0 here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from normsweep.data.cifar10 import download, found_in
from normsweep.data.dataset import UNKNOWN_STATS, DataError, DataInfo, Prepared, RawData, Request, Source, image_bytes

CLASSES = tuple(str(d) for d in range(10))


def _bad(path: Path, what: str) -> DataError:
    return DataError(f"{path} is not a readable SVHN .mat file ({what}); delete it and pass data.download=true "
                     f"to download it again (or copy it again from where you got it)")  # fmt: skip


def _count(path: Path) -> int:
    """The images in ``path``, from its header (scipy's ``whosmat``), without reading them."""
    from scipy.io import whosmat

    try:
        shapes = {name: shape for name, shape, _ in whosmat(str(path))}
    except Exception as e:
        raise _bad(path, f"{type(e).__name__}: {e}") from e
    if "X" not in shapes or len(shapes["X"]) != 4 or tuple(shapes["X"][:3]) != (32, 32, 3):
        raise _bad(path, f"no X of shape 32x32x3xN; it holds {shapes}")
    return int(shapes["X"][3])


def _read(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from scipy.io import loadmat

    try:
        mat = loadmat(str(path), variable_names=["X", "y"])
        x, y = mat["X"], np.asarray(mat["y"]).reshape(-1).astype(np.int64)
    except Exception as e:  # a truncated file: ValueError, OSError, EOFError, zlib's error, ...
        raise _bad(path, f"{type(e).__name__}: {e}") from e
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
        raise _bad(path, f"X is {x.dtype} {x.shape} for {len(y)} labels; expected uint8 32x32x3xN")
    if len(y) and (y.min() < 1 or y.max() > 10):
        raise _bad(path, f"labels {int(y.min())}..{int(y.max())}; SVHN's are 1..10 (10 for the digit 0)")
    y[y == 10] = 0
    return torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1))), torch.from_numpy(y)


def _files(req: Request) -> list[str]:
    return ["train_32x32.mat", "test_32x32.mat"] + (["extra_32x32.mat"] if req.extra else [])


def read(root: Path, names: list[str]) -> RawData:
    (train_x, train_y), (test_x, test_y), *extra = (_read(root / n) for n in names)
    if extra:
        train_x, train_y = torch.cat([train_x, extra[0][0]]), torch.cat([train_y, extra[0][1]])
    return RawData(train_x, train_y, test_x, test_y, DataInfo("svhn", CLASSES, 32, UNKNOWN_STATS, UNKNOWN_STATS))


def prepare(req: Request) -> Prepared:
    root, names = req.root, _files(req)
    missing = [n for n in names if not (root / n).is_file()]
    if missing and req.download:
        for n in missing:
            download(root, "SVHN", f"SVHN's {n}", split=n.split("_")[0])
        missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise DataError(f"data.root={root} has no {missing} (it {found_in(root)}); expected SVHN's "
                        f"{' and '.join(names)} (torchvision's download) there; pass data.root=PATH to a folder "
                        f"that has them, or data.download=true to download them into data.root")  # fmt: skip
    n = sum(_count(root / name) for name in names)
    return Prepared("extra" if req.extra else "train", [root / name for name in names], image_bytes(n, 32),
                    lambda: read(root, names))  # fmt: skip


SOURCE = Source(prepare, options={"extra": True}, doc="SVHN's cropped digits, .mat files; data.extra=true adds extra")
