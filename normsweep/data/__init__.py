"""CIFAR-10 on the training device: find it, decode it once, cache it, split it.

Two layouts are read, and detected from what ``data.root`` holds:

* ``pickle``: ``ROOT/cifar-10-batches-py/{data_batch_1..5,test_batch}``, torchvision's download of
  the original release (downloaded and checksum-verified by torchvision when ``data.download``);
* ``folder``: ``ROOT/train/<class>/*.png|jpg`` and ``ROOT/test/<class>/...``, classes in
  alphabetical order (which is CIFAR-10's label order for its usual class names).

Decoded images are cached as one uint8 tensor file per source (``data.cache_dir``), so a second
run starts within seconds. The cache records a format version, a fingerprint of the source files
and a checksum of its contents; a cache that does not match is rebuilt, never trusted.

Nothing read here executes code: the pickle batches go through :class:`CifarUnpickler`, which
admits only what a CIFAR-10 batch holds, and the cache is read with ``weights_only=True``.
Hidden files (names starting with '.', such as macOS's ``._name.jpg`` and ``.DS_Store``) are
not data and are skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from normsweep.base import results
from normsweep.base.errors import NormsweepError

log = logging.getLogger(__name__)

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
PICKLE_DIR = "cifar-10-batches-py"
CACHE_VERSION = 1

HOW_TO_GET = (
    "expected ROOT/cifar-10-batches-py/ (torchvision's CIFAR-10) or ROOT/train/<class>/*.jpg|png "
    "and ROOT/test/<class>/...; pass data.root=PATH to a folder that has one, or data.download=true "
    "to download the original CIFAR-10 into data.root"
)


class DataError(NormsweepError, RuntimeError):
    """The data could not be read; the message names the file or folder and the fix."""


@dataclass
class RawCIFAR:
    """The whole dataset as uint8 NCHW tensors on the CPU."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple[str, ...]


@dataclass
class Split:
    x: torch.Tensor  # uint8, (N, 3, 32, 32)
    y: torch.Tensor  # int64, (N,)
    index: torch.Tensor  # position of each image in its source set (train or test)

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: torch.device) -> "Split":
        return Split(self.x.to(device), self.y.to(device), self.index)


@dataclass
class Splits:
    train: Split
    val: Split
    test: Split
    classes: tuple[str, ...]


# ---------------------------------------------------------------- finding and reading the source


def detect_format(root: Path, fmt: str = "auto") -> str:
    """``pickle`` or ``folder``: the layout ``root`` holds (or ``fmt`` if given and present)."""
    has_pickle = (root / PICKLE_DIR).is_dir()
    has_folder = (root / "train").is_dir()
    if fmt == "pickle" and has_pickle or fmt == "folder" and has_folder:
        return fmt
    if fmt == "auto" and (has_pickle or has_folder):
        return "pickle" if has_pickle else "folder"
    if not root.exists():
        found = "does not exist"
    else:
        entries = sorted(p.name for p in root.iterdir())[:8]
        found = f"holds {entries}" if entries else "is empty"
    wanted = {"auto": "no 'cifar-10-batches-py/' or 'train/'", "pickle": "no 'cifar-10-batches-py/'",
              "folder": "no 'train/'"}[fmt]  # fmt: skip
    raise DataError(f"data.root={root} has {wanted} (it {found}); {HOW_TO_GET}")


def download_pickle(root: Path) -> None:
    """torchvision's download of the original CIFAR-10, with its MD5 check."""
    from torchvision.datasets import CIFAR10

    log.info("downloading CIFAR-10 into %s", root)
    try:
        CIFAR10(str(root), train=True, download=True)
    except Exception as e:  # no network, proxy, disk full: say what and how to go on
        raise DataError(
            f"could not download CIFAR-10 into data.root={root}: {type(e).__name__}: {e}; "
            f"download it elsewhere, or pass data.root=PATH to a copy you have"
        ) from e


# Every global a CIFAR-10 batch pickle refers to: numpy arrays (numpy 1.x and 2.x module names;
# _frombuffer is how numpy pickles an array at protocol 5), the dtype, and what Python 3 writes
# for bytes at protocols 0-2. Dicts, lists, strings and numbers need no global at all.
PICKLE_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("_codecs", "encode"), ("__builtin__", "bytes"), ("builtins", "bytes"),
})  # fmt: skip


class CifarUnpickler(pickle.Unpickler):
    """An unpickler that admits only what a CIFAR-10 batch holds, so reading one never runs code.

    ``pickle.load`` calls whatever callable a file names (``os.system``, ``builtins.open``, ...);
    this one refuses every global outside :data:`PICKLE_GLOBALS` before it is looked up, with a
    :class:`DataError` naming the file and the global.
    """

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="latin1")  # the original batches were written by Python 2
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in PICKLE_GLOBALS:
            raise DataError(
                f"{self.path} refers to {module}.{name}, which a CIFAR-10 batch never holds (only dicts, lists, "
                f"strings, numbers and numpy arrays); refused, nothing in it was run. Delete "
                f"{self.path.parent} and download CIFAR-10 again (data.download=true)"
            )
        return super().find_class(module, name)


def load_pickle(path: Path) -> object:
    """One CIFAR-10 pickle (a batch or ``batches.meta``), read with :class:`CifarUnpickler`."""
    with open(path, "rb") as f:
        return CifarUnpickler(f, path).load()


def _unpickle(path: Path) -> dict:
    try:
        batch = load_pickle(path)
        x = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(batch["labels"], dtype=np.int64)
    except FileNotFoundError:
        raise DataError(f"{path} is missing; a cifar-10-batches-py folder needs data_batch_1..5 and test_batch")
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


def read_pickle(root: Path) -> RawCIFAR:
    folder = root / PICKLE_DIR
    train = [_unpickle(folder / f"data_batch_{i}") for i in range(1, 6)]
    test = _unpickle(folder / "test_batch")
    classes = _read_meta(folder / "batches.meta", max(int(b["y"].max(initial=0)) for b in [*train, test]))
    return RawCIFAR(
        torch.from_numpy(np.concatenate([b["x"] for b in train])),
        torch.from_numpy(np.concatenate([b["y"] for b in train])),
        torch.from_numpy(test["x"]),
        torch.from_numpy(test["y"]),
        classes,
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


def _hidden(name: str) -> bool:
    """Not data: macOS's ``._name.jpg`` resource forks and ``.DS_Store``, and any other dot-file."""
    return name.startswith(".")


def _class_files(split_dir: Path) -> dict[str, list[Path]]:
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not _hidden(p.name))
    if not classes:
        raise DataError(f"{split_dir} has no class folders; expected {split_dir}/<class>/*.jpg|png")
    files = {}
    for c in classes:
        files[c] = sorted(
            p for p in (split_dir / c).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not _hidden(p.name)
        )
        if not files[c]:
            raise DataError(f"class folder {split_dir / c} holds no .png/.jpg images")
    return files


def _decode(paths: list[Path]) -> torch.Tensor:
    from PIL import Image

    out = np.empty((len(paths), 32, 32, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except Exception as e:
            raise DataError(f"{path} could not be decoded as an image ({type(e).__name__}: {e}); "
                            f"replace or delete that file") from e  # fmt: skip
        if img.size != (32, 32):
            raise DataError(f"{path} is {img.size[0]}x{img.size[1]} pixels; CIFAR-10 images are 32x32")
        out[i] = np.asarray(img)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def read_folder(root: Path) -> RawCIFAR:
    train_files = _class_files(root / "train")
    if not (root / "test").is_dir():
        raise DataError(f"data.root={root} has 'train/' but no 'test/'; {HOW_TO_GET}")
    test_files = _class_files(root / "test")
    if set(train_files) != set(test_files):
        raise DataError(
            f"train/ and test/ under {root} have different classes: only in train/: "
            f"{sorted(set(train_files) - set(test_files))}, only in test/: "
            f"{sorted(set(test_files) - set(train_files))}"
        )
    classes = tuple(sorted(train_files))

    def load(files: dict[str, list[Path]]) -> tuple[torch.Tensor, torch.Tensor]:
        paths = [p for c in classes for p in files[c]]
        labels = torch.tensor([k for k, c in enumerate(classes) for _ in files[c]], dtype=torch.int64)
        return _decode(paths), labels

    log.info("decoding the images under %s once (cached for later runs)", root)
    train_x, train_y = load(train_files)
    test_x, test_y = load(test_files)
    return RawCIFAR(train_x, train_y, test_x, test_y, classes)


# ---------------------------------------------------------------- the cache


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "normsweep"


def source_fingerprint(root: Path, fmt: str) -> str:
    """A hash of the source files' names, sizes and modification times (hidden files left out)."""
    h = hashlib.sha256(f"v{CACHE_VERSION}:{fmt}:{root.resolve()}".encode())
    base = root / PICKLE_DIR if fmt == "pickle" else root
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        for name in sorted(f for f in filenames if not _hidden(f)):
            st = os.stat(os.path.join(dirpath, name))
            h.update(f"{os.path.relpath(os.path.join(dirpath, name), base)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def _checksum(raw: RawCIFAR) -> str:
    h = hashlib.sha256()
    for t in (raw.train_x, raw.train_y, raw.test_x, raw.test_y):
        h.update(t.contiguous().numpy())  # hashes the buffer in place, no copy
    h.update(",".join(raw.classes).encode())
    return h.hexdigest()


def _read_cache(path: Path, fingerprint: str) -> RawCIFAR | None:
    try:
        blob = results.load_torch(path)  # never executes code
        raw = RawCIFAR(blob["train_x"], blob["train_y"], blob["test_x"], blob["test_y"], tuple(blob["classes"]))
        if blob["version"] != CACHE_VERSION or blob["fingerprint"] != fingerprint:
            raise ValueError("made from other source files or by another normsweep version")
        if blob["checksum"] != _checksum(raw):
            raise ValueError("contents do not match their checksum")
        return raw
    except Exception as e:
        log.warning("ignoring the data cache %s (%s: %s); rebuilding it", path, type(e).__name__, e)
        return None


def _write_cache(path: Path, raw: RawCIFAR, fingerprint: str) -> None:
    blob = {
        "version": CACHE_VERSION,
        "fingerprint": fingerprint,
        "checksum": _checksum(raw),
        "train_x": raw.train_x,
        "train_y": raw.train_y,
        "test_x": raw.test_x,
        "test_y": raw.test_y,
        "classes": list(raw.classes),
    }
    results.save_torch(path, blob)  # atomic: readers see the old file or the new one


def load_raw(root: str | Path, fmt: str = "auto", download: bool = False, cache_dir: str | Path | None = None) -> RawCIFAR:
    """The whole dataset, from the cache when it is valid, else decoded (and cached)."""
    root = Path(root).expanduser()
    try:
        fmt = detect_format(root, fmt)
    except DataError:
        if not (download and fmt in ("auto", "pickle")):
            raise
        download_pickle(root)
        fmt = detect_format(root, "pickle")
    fingerprint = source_fingerprint(root, fmt)
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    cache_file = cache / f"cifar10-{fmt}-{fingerprint}.pt"
    seen = _stat(cache_file)
    if seen is not None:
        raw = _read_cache(cache_file, fingerprint)
        if raw is not None:
            return raw
    with _cache_writer(cache_file):
        if _stat(cache_file) not in (None, seen):  # another process wrote it while this one waited
            raw = _read_cache(cache_file, fingerprint)
            if raw is not None:
                return raw
        raw = read_pickle(root) if fmt == "pickle" else read_folder(root)
        try:
            _write_cache(cache_file, raw, fingerprint)
        except OSError as e:  # a full disk or read-only cache dir costs time, not the run
            log.warning("not caching the decoded images: %s; this run goes on without the cache "
                        "(or pass data.cache_dir=PATH to a writable folder with free space)", e)  # fmt: skip
    return raw


def _stat(path: Path) -> tuple[int, int] | None:
    """(size, mtime) of ``path``, None if it does not exist: tells whether a file was rewritten."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns


@contextlib.contextmanager
def _cache_writer(cache_file: Path):
    """One process at a time decodes and writes ``cache_file``; the others wait, then read it.

    The holder of the lock (``.<name>.lock`` beside it, an OS file lock that a killed process
    drops) is the only writer, so any temporary file of ``cache_file`` it finds was left by a
    killed writer and is removed: a kill while caching never leaves a 150 MB file behind for good.
    Where the lock cannot be taken (a read-only cache folder), decoding goes on without it.
    """
    from filelock import FileLock, Timeout

    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(cache_file.parent / f".{cache_file.name}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("waiting for another process to finish writing the data cache %s", cache_file)
            lock.acquire()
    except OSError as e:
        log.debug("no lock for the data cache %s (%s)", cache_file, e)
        yield
        return
    try:
        results.remove_stray_temp_files(cache_file.parent, cache_file.name)
        yield
    finally:
        lock.release()


# ---------------------------------------------------------------- splits


def make_splits(
    raw: RawCIFAR, val_size: int, train_size: int | None = None, test_size: int | None = None, split_seed: int = 0
) -> Splits:
    """Deterministic validation split carved from the training set; optional subsets for quick runs."""
    n = len(raw.train_y)
    if val_size >= n:
        raise DataError(f"data.val_size={val_size} leaves no training images (the training set has {n})")
    g = torch.Generator().manual_seed(split_seed)
    perm = torch.randperm(n, generator=g)
    val_idx, train_idx = perm[:val_size], perm[val_size:]
    if train_size is not None:
        if train_size > len(train_idx):
            raise DataError(
                f"data.train_size={train_size} is more than the {len(train_idx)} training images left after "
                f"data.val_size={val_size}; lower it or pass data.train_size=null for all"
            )
        train_idx = train_idx[:train_size]
    test_idx = torch.arange(len(raw.test_y))
    if test_size is not None and test_size < len(test_idx):
        test_idx = torch.randperm(len(test_idx), generator=g)[:test_size].sort().values

    def take(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> Split:
        return Split(x[idx].contiguous(), y[idx].contiguous(), idx)

    return Splits(
        take(raw.train_x, raw.train_y, train_idx),
        take(raw.train_x, raw.train_y, val_idx),
        take(raw.test_x, raw.test_y, test_idx),
        raw.classes,
    )
