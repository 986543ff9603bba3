"""What every data source shares: its error, the facts it gives the run (:class:`DataInfo`), the decoded
images (:class:`RawData`), what a source is (:class:`Source`) and the memory guard.

A source (one module: ``cifar10``, ``cifar100``, ``svhn``, ``folder``) turns the ``data.*`` options
(:class:`Request`) into a :class:`Prepared`: the files it will read, the decoded size it will need,
and a ``read`` that decodes them. Everything after that (the cache, the memory limit, the mean and
std, the split) is common, in ``normsweep.data``'s :func:`~normsweep.data.load_raw`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from normsweep.base.errors import NormsweepError


class DataError(NormsweepError, RuntimeError):
    """The data could not be read; the message names the file or folder and the fix."""


@dataclass(frozen=True)
class DataInfo:
    """The facts of a dataset that the model, the augmentation and results.json take from the data."""

    name: str  # the source: cifar10 | cifar100 | svhn | folder
    classes: tuple[str, ...]
    image_size: int  # square images: H = W
    mean: tuple[float, float, float]  # per channel, of the training images scaled to [0, 1]
    std: tuple[float, float, float]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class RawData:
    """The whole dataset as uint8 NCHW tensors on the CPU; ``val_*`` only where the source has its own
    validation split (a folder's ``val/``), else the split is carved from the training images."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    info: DataInfo
    val_x: torch.Tensor | None = None
    val_y: torch.Tensor | None = None

    @property
    def classes(self) -> tuple[str, ...]:
        return self.info.classes

    def tensors(self) -> list[torch.Tensor]:
        return [
            t for t in (self.train_x, self.train_y, self.test_x, self.test_y, self.val_x, self.val_y) if t is not None
        ]


UNKNOWN_STATS = (0.0, 0.0, 0.0)  # a source's mean and std until load_raw computes them from its training images

RawCIFAR = RawData  # the name of normsweep <= 0.1's CIFAR-10-only record


@dataclass(frozen=True)
class Request:
    """The ``data.*`` options a source reads (``config.DataConfig``, less the split's)."""

    root: Path
    format: str = "auto"  # cifar10: auto | pickle | folder
    download: bool = False
    labels: str | None = None  # cifar100: fine | coarse
    extra: bool | None = None  # svhn: add extra_32x32.mat to the training images
    image_size: int | None = None  # folder: shorter side resized to it, centre-cropped


@dataclass
class Prepared:
    """A source located and sized, not yet decoded."""

    variant: str  # the cache file's middle name: pickle | folder | fine | coarse | train | extra | <size>px
    files: list[Path]  # files or folders whose names, sizes and times make the cache's fingerprint
    nbytes: int  # the decoded uint8 images' size, train + val + test
    read: Callable[[], RawData]  # decodes the files; a mean and std of UNKNOWN_STATS are computed by load_raw


@dataclass(frozen=True)
class Source:
    """A registered data source (``normsweep.data.DATASETS``): ``data.source=<name>``."""

    prepare: Callable[[Request], Prepared]
    options: dict[str, bool]  # its own data.* keys -> whether it needs a value (conf/data/<name>.yaml sets it)
    formats: tuple[str, ...] = ("auto",)  # the data.format values it reads
    doc: str = ""


def image_bytes(n_images: int, size: int) -> int:
    return n_images * 3 * size * size


def machine_memory() -> int | None:
    """This machine's RAM in bytes, None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(name: str, root: Path, nbytes: int, max_memory_gb: float | None, options: str) -> None:
    """Stop before decoding when the decoded images would take more than ``data.max_memory_gb`` (default: half
    of the machine's RAM), naming the size they need and ``options`` (what makes them smaller)."""
    ram = machine_memory()
    if max_memory_gb is None:
        if ram is None:
            return
        limit, said = ram / 2, f"data.max_memory_gb=null: half of this machine's {ram / 1e9:.1f} GB"
    else:
        limit, said = max_memory_gb * 1e9, f"data.max_memory_gb={max_memory_gb:g}"
    if nbytes > limit:
        raise DataError(
            f"data.source={name} at data.root={root} decodes to {nbytes / 1e9:.2f} GB of uint8 images, over the "
            f"limit of {limit / 1e9:.2f} GB ({said}); {options}, or pass data.max_memory_gb=N to allow N GB "
            f"(the machine needs that much free memory, and more for the split's copies)"
        )


def channel_stats(x: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images (N, 3, H, W) scaled to [0, 1], summed exactly in
    int64 and divided in float64, a chunk of images at a time."""
    if len(x) == 0:
        raise DataError("the training split holds no images")
    s = torch.zeros(x.shape[1], dtype=torch.int64)
    s2 = torch.zeros(x.shape[1], dtype=torch.int64)
    for i in range(0, len(x), chunk):
        c = x[i : i + chunk].to(torch.int64)
        s += c.sum((0, 2, 3))
        s2 += (c * c).sum((0, 2, 3))
    n = len(x) * x.shape[2] * x.shape[3]
    mean = s.double() / n
    var = (s2.double() / n - mean * mean).clamp_(min=0)
    return tuple((mean / 255).tolist()), tuple((var.sqrt() / 255).tolist())
