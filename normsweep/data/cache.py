"""The decoded images cached as one uint8 tensor file per (source, variant, source files), so a second run
starts within seconds.

The file records a format version, a fingerprint of the source files and of the options that shape
the images (source, variant: labels, extra, size), the dataset's facts (classes, image size, mean and
std) and a checksum of all of it; a cache that does not match is rebuilt, never trusted. It is written
atomically under a lock (one writer; a killed writer's temporary file is removed by the next), so a
crash while it is written leaves the previous file or none. It is read with ``weights_only=True``:
nothing in it runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path

from normsweep.base import results
from normsweep.data.dataset import DataInfo, RawData
from normsweep.data.images import hidden

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: any source, the dataset's facts (DataInfo) and an optional val split in the file


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "normsweep"


def fingerprint(paths: list[Path], key: str) -> str:
    """A hash of ``key`` and the files' names, sizes and modification times (folders walked, hidden files left out)."""
    h = hashlib.sha256(f"v{CACHE_VERSION}:{key}".encode())
    for base in paths:
        h.update(f"[{base.resolve()}]".encode())
        if base.is_file():
            st = base.stat()
            h.update(f"{base.name}:{st.st_size}:{st.st_mtime_ns};".encode())
            continue
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if not hidden(d))
            for name in sorted(f for f in filenames if not hidden(f)):
                st = os.stat(os.path.join(dirpath, name))
                h.update(
                    f"{os.path.relpath(os.path.join(dirpath, name), base)}:{st.st_size}:{st.st_mtime_ns};".encode()
                )
    return h.hexdigest()[:16]


def _checksum(raw: RawData) -> str:
    h = hashlib.sha256()
    for t in raw.tensors():
        h.update(t.contiguous().numpy())  # hashes the buffer in place, no copy
    i = raw.info
    h.update(repr((i.name, list(i.classes), i.image_size, list(i.mean), list(i.std))).encode())
    return h.hexdigest()


def read_cache(path: Path, fingerprint: str) -> RawData | None:
    try:
        blob = results.load_torch(path)  # never executes code
        if blob["version"] != CACHE_VERSION or blob["fingerprint"] != fingerprint:
            raise ValueError("made from other source files or options, or by another normsweep version")
        i = blob["info"]
        info = DataInfo(i["name"], tuple(i["classes"]), int(i["image_size"]), tuple(i["mean"]), tuple(i["std"]))
        raw = RawData(blob["train_x"], blob["train_y"], blob["test_x"], blob["test_y"], info,
                      blob.get("val_x"), blob.get("val_y"))  # fmt: skip
        if blob["checksum"] != _checksum(raw):
            raise ValueError("contents do not match their checksum")
        return raw
    except Exception as e:
        log.warning("ignoring the data cache %s (%s: %s); rebuilding it", path, type(e).__name__, e)
        return None


def write_cache(path: Path, raw: RawData, fingerprint: str) -> None:
    i = raw.info
    blob = {
        "version": CACHE_VERSION,
        "fingerprint": fingerprint,
        "checksum": _checksum(raw),
        "info": {
            "name": i.name,
            "classes": list(i.classes),
            "image_size": i.image_size,
            "mean": list(i.mean),
            "std": list(i.std),
        },  # fmt: skip
        "train_x": raw.train_x,
        "train_y": raw.train_y,
        "test_x": raw.test_x,
        "test_y": raw.test_y,
        "val_x": raw.val_x,
        "val_y": raw.val_y,
        "classes": list(i.classes),
    }
    results.save_torch(path, blob)  # atomic: readers see the old file or the new one


def stat(path: Path) -> tuple[int, int] | None:
    """(size, mtime) of ``path``, None if it does not exist: tells whether a file was rewritten."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns


@contextlib.contextmanager
def cache_writer(cache_file: Path):
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
