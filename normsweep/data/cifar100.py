"""CIFAR-100 (``data=cifar100``): ``ROOT/cifar-100-python/{train,test,meta}``, the python-pickle release
(torchvision's download, checksum-verified, when ``data.download`` and absent), read through the
restricted unpickler. ``data.labels=fine`` gives its 100 classes, ``coarse`` its 20 superclasses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from normsweep.data.cifar10 import download, found_in
from normsweep.data.dataset import UNKNOWN_STATS, DataError, DataInfo, Prepared, RawData, Request, Source, image_bytes
from normsweep.data.unpickle import load_pickle

FOLDER = "cifar-100-python"
FIX = "download CIFAR-100 again"


def _load(path: Path) -> dict:
    try:
        return load_pickle(path, "CIFAR-100", FIX)  # type: ignore[return-value]
    except FileNotFoundError:
        raise DataError(f"{path} is missing; a {FOLDER} folder needs train, test and meta; delete it and pass "
                        f"data.download=true to download CIFAR-100 again") from None  # fmt: skip
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path} is not a readable CIFAR-100 file ({type(e).__name__}: {e}); delete "
                        f"{path.parent} and download it again (data.download=true)") from e  # fmt: skip


def _split(path: Path, labels: str, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    d = _load(path)
    try:
        x = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(d[f"{labels}_labels"], dtype=np.int64)
    except Exception as e:
        raise DataError(f"{path} is not a CIFAR-100 file with 'data' and '{labels}_labels' "
                        f"({type(e).__name__}: {e}); delete {path.parent} and download it again") from e  # fmt: skip
    if len(x) != len(y):
        raise DataError(f"{path} has {len(x)} images but {len(y)} labels")
    if len(y) and (y.min() < 0 or y.max() >= n_classes):
        raise DataError(f"{path} has {labels} labels {int(y.min())}..{int(y.max())}, outside its meta file's "
                        f"{n_classes} {labels}_label_names; delete {path.parent} and download it again")  # fmt: skip
    return torch.from_numpy(x), torch.from_numpy(y)


def _names(path: Path, labels: str) -> tuple[str, ...]:
    names = _load(path).get(f"{labels}_label_names")
    if not isinstance(names, list) or not all(isinstance(n, (str, bytes)) for n in names) or len(names) < 2:
        raise DataError(f"{path} has no list of {labels}_label_names; delete {path.parent} and download it again")
    return tuple(n.decode() if isinstance(n, bytes) else n for n in names)


def read(root: Path, labels: str) -> RawData:
    folder = root / FOLDER
    classes = _names(folder / "meta", labels)
    train_x, train_y = _split(folder / "train", labels, len(classes))
    test_x, test_y = _split(folder / "test", labels, len(classes))
    return RawData(train_x, train_y, test_x, test_y, DataInfo("cifar100", classes, 32, UNKNOWN_STATS, UNKNOWN_STATS))


def prepare(req: Request) -> Prepared:
    root, labels = req.root, req.labels or "fine"
    if not (root / FOLDER).is_dir():
        if not req.download:
            raise DataError(f"data.root={root} has no '{FOLDER}/' (it {found_in(root)}); expected "
                            f"ROOT/{FOLDER}/train, test and meta (torchvision's CIFAR-100); pass data.root=PATH to a "
                            f"folder that has it, or data.download=true to download it into data.root")  # fmt: skip
        download(root, "CIFAR100", "CIFAR-100", train=True)
        download(root, "CIFAR100", "CIFAR-100", train=False)
    return Prepared(labels, [root / FOLDER], image_bytes(60000, 32), lambda: read(root, labels))


SOURCE = Source(prepare, options={"labels": True}, doc="CIFAR-100, python pickles; data.labels=fine|coarse")
