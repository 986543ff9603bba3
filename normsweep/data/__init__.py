"""The data on the training device: find it, decode it once, cache it, split it.

One module per source, registered in :data:`DATASETS` (``data.source``, set by ``conf/data/<name>.yaml``):
``cifar10`` (the study's dataset: pickle or class folders), ``cifar100``, ``svhn`` and ``folder`` (any
class-folder dataset). Adding a dataset is one module with a ``prepare(request) -> Prepared`` and one
``DATASETS.register`` line here, plus its ``conf/data/<name>.yaml``. What every source shares:
``dataset`` (the error, :class:`DataInfo`, the memory guard), ``images`` (class folders decoded on every
core), ``cache`` (the decoded images, atomic and checksummed), ``splits``.

:func:`load_raw` gives the whole dataset as uint8 tensors with its :class:`DataInfo` (classes, image
size, per-channel mean and std: CIFAR-10's published constants, else computed once from the training
images and cached with them); :func:`make_splits` the training, validation and test splits.

Nothing read here executes code: the pickles go through :class:`CifarUnpickler`, which admits only what
a CIFAR batch holds, and the cache is read with ``weights_only=True``. Hidden files (names starting with
'.', such as macOS's ``._name.jpg`` and ``.DS_Store``) are not data and are skipped.
"""

from __future__ import annotations

import logging
from pathlib import Path

from normsweep.base.registry import Registry
from normsweep.data import cifar10, cifar100, folder, svhn
from normsweep.data.cache import (  # noqa: F401 - the package's API
    CACHE_VERSION,
    cache_writer,
    default_cache_dir,
    fingerprint,
    read_cache,
    stat,
    write_cache,
)
from normsweep.data.cifar10 import (  # noqa: F401
    CLASSES,
    HOW_TO_GET,
    IMAGE_SUFFIXES,
    MEAN,
    PICKLE_DIR,
    STD,
    detect_format,
    download_pickle,
    read_folder,
    read_pickle,
)
from normsweep.data.dataset import (  # noqa: F401
    UNKNOWN_STATS,
    DataError,
    DataInfo,
    Prepared,
    RawCIFAR,
    RawData,
    Request,
    Source,
    channel_stats,
    check_memory,
)
from normsweep.data.splits import Split, Splits, make_splits  # noqa: F401
from normsweep.data.unpickle import PICKLE_GLOBALS, CifarUnpickler, load_pickle  # noqa: F401

log = logging.getLogger(__name__)

DATASETS: Registry[Source] = Registry("data.source")
DATASETS.register("cifar10", cifar10.SOURCE)
DATASETS.register("cifar100", cifar100.SOURCE)
DATASETS.register("svhn", svhn.SOURCE)
DATASETS.register("folder", folder.SOURCE)

# What makes a source's decoded images smaller, for the memory guard's message.
SMALLER = {"svhn": "leave out data.extra", "folder": "pass a smaller data.image_size"}


def source_fingerprint(root: str | Path, fmt: str) -> str:
    """The cache fingerprint of CIFAR-10's ``fmt`` layout under ``root``."""
    root = Path(root)
    return fingerprint([root / PICKLE_DIR if fmt == "pickle" else root], f"cifar10:{fmt}:{root.resolve()}")


def load_raw(
    root: str | Path,
    fmt: str = "auto",
    download: bool = False,
    cache_dir: str | Path | None = None,
    *,
    source: str = "cifar10",
    labels: str | None = None,
    extra: bool | None = None,
    image_size: int | None = None,
    max_memory_gb: float | None = None,
) -> RawData:
    """The whole dataset ``source`` (``DATASETS``), from the cache when it is valid, else decoded (and cached).

    Stops before decoding (or reading the cache) when the images would take more than ``max_memory_gb``
    (default: half of the machine's RAM).
    """
    root = Path(root).expanduser()
    name = getattr(source, "value", source)
    src = DATASETS.entry(name)
    req = Request(root, getattr(fmt, "value", fmt), download, labels, extra, image_size)
    prepared = src.prepare(req)
    check_memory(name, root, prepared.nbytes, max_memory_gb, SMALLER.get(name, "use a smaller dataset"))
    key = f"{name}:{prepared.variant}:{root.resolve()}"
    fp = fingerprint(prepared.files, key)  # for CIFAR-10 the same as source_fingerprint(root, variant)
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    cache_file = cache / f"{name}-{prepared.variant}-{fp}.pt"
    seen = stat(cache_file)
    if seen is not None:
        raw = read_cache(cache_file, fp)
        if raw is not None:
            return raw
    with cache_writer(cache_file):
        if stat(cache_file) not in (None, seen):  # another process wrote it while this one waited
            raw = read_cache(cache_file, fp)
            if raw is not None:
                return raw
        raw = prepared.read()
        if raw.info.std == UNKNOWN_STATS:  # not published: computed once from the training images, cached
            mean, std = channel_stats(raw.train_x)
            raw.info = DataInfo(raw.info.name, raw.info.classes, raw.info.image_size, mean, std)  # type: ignore[arg-type]
            log.info("%s: per-channel mean %s, std %s of the training images", name,
                     tuple(round(m, 4) for m in mean), tuple(round(s, 4) for s in std))  # fmt: skip
        try:
            write_cache(cache_file, raw, fp)
        except OSError as e:  # a full disk or read-only cache dir costs time, not the run
            log.warning("not caching the decoded images: %s; this run goes on without the cache "
                        "(or pass data.cache_dir=PATH to a writable folder with free space)", e)  # fmt: skip
    return raw
