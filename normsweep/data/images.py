"""Image files to uint8 arrays: class folders listed, files decoded on every core, resized where asked.

Decoding opens each file with Pillow, converts it to RGB (grayscale, palette and RGBA too: alpha is
dropped), and, with a ``resize`` size, scales the shorter side to it (bilinear, antialiased; a JPEG is
first decoded at the smallest power-of-two scale still at least that large) and crops the centre
square, as torchvision's ``Resize(size)`` + ``CenterCrop(size)`` do. Many files are decoded by a pool
of processes, one per core, in chunks, with a progress line in the log.
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np

from normsweep.data.dataset import DataError

log = logging.getLogger(__name__)

POOL_MIN_FILES = 2000  # fewer files decode faster in this process than a pool starts
CHUNK = 500  # files a pool task decodes


def _image_suffixes() -> frozenset[str]:
    from PIL import Image

    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def hidden(name: str) -> bool:
    """Not data: macOS's ``._name.jpg`` resource forks and ``.DS_Store``, and any other dot-file."""
    return name.startswith(".")


def class_files(split_dir: Path) -> dict[str, list[Path]]:
    """``split_dir/<class>/<image>`` as class -> sorted image files (classes sorted by name)."""
    suffixes = _image_suffixes()
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not hidden(p.name))
    if not classes:
        raise DataError(f"{split_dir} has no class folders; expected {split_dir}/<class>/*.jpg|png")
    files = {}
    for c in classes:
        files[c] = sorted(p for p in (split_dir / c).iterdir() if p.suffix.lower() in suffixes and not hidden(p.name))
        if not files[c]:
            raise DataError(
                f"class folder {split_dir / c} holds no .png/.jpg images (nor any other file Pillow reads); "
                f"put its images there or delete the folder"
            )
    return files


def same_classes(root: Path, splits: dict[str, dict[str, list[Path]]]) -> None:
    """Every split of ``root`` has train/'s classes, or a DataError naming the difference."""
    train = set(splits["train"])
    for name, files in splits.items():
        if name != "train" and set(files) != train:
            raise DataError(
                f"train/ and {name}/ under {root} have different classes: only in train/: "
                f"{sorted(train - set(files))}, only in {name}/: {sorted(set(files) - train)}; "
                f"every split needs the same class folders"
            )


def image_size_of(path: Path) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding it."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.size
    except Exception as e:
        raise DataError(f"{path} could not be decoded as an image ({type(e).__name__}: {e}); "
                        f"replace or delete that file") from e  # fmt: skip


def _decode_one(path: Path, size: int, resize: bool, mismatch: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as img:
            if resize and img.format == "JPEG" and min(img.size) >= 2 * size:
                img.draft("RGB", (size, size))  # decode at 1/2, 1/4 or 1/8 scale, still >= size
            img = img.convert("RGB")  # also loads it: a truncated file fails here
    except Exception as e:
        raise DataError(f"{path} could not be decoded as an image ({type(e).__name__}: {e}); "
                        f"replace or delete that file") from e  # fmt: skip
    w, h = img.size
    if resize and (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.BILINEAR)
        left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
    elif (w, h) != (size, size):
        raise DataError(f"{path} is {w}x{h} pixels; {mismatch}")
    return np.asarray(img)


def _decode_chunk(paths: list[Path], size: int, resize: bool, mismatch: str) -> np.ndarray:
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        out[i] = _decode_one(path, size, resize, mismatch)
    return out


def decode_files(
    paths: list[Path], size: int, resize: bool, mismatch: str = "", workers: int | None = None
) -> np.ndarray:
    """The images at ``paths`` as uint8 (N, size, size, 3): resized (``resize``) or required to be
    ``size`` x ``size`` (else a DataError ending with ``mismatch``). Uses a process per core for many files."""
    workers = workers or os.cpu_count() or 1
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    if multiprocessing.current_process().daemon:  # a daemonic process may not start children: decode here
        workers = 1
    if workers < 2 or len(paths) < POOL_MIN_FILES:
        for i, path in enumerate(paths):
            out[i] = _decode_one(path, size, resize, mismatch)
        return out
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    t0, done, said = time.perf_counter(), 0, 0
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
        futures = {pool.submit(_decode_chunk, paths[i : i + CHUNK], size, resize, mismatch): i
                   for i in range(0, len(paths), CHUNK)}  # fmt: skip
        try:
            for future in concurrent.futures.as_completed(futures):
                i = futures[future]
                chunk = future.result()  # a DataError of a worker is raised here, naming the file
                out[i : i + len(chunk)] = chunk
                done += len(chunk)
                if done * 10 // len(paths) > said or done == len(paths):
                    said = done * 10 // len(paths)
                    log.info("decoded %s of %s images (%d%%, %.0f s, %d processes)",
                             f"{done:,}", f"{len(paths):,}", 100 * done // len(paths), time.perf_counter() - t0, workers)  # fmt: skip
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    return out
