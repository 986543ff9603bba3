"""The restricted unpickler the CIFAR sources read their python-pickle files with: reading one never runs code."""

from __future__ import annotations

import pickle
from pathlib import Path

from normsweep.data.dataset import DataError

# Every global a CIFAR batch pickle refers to: numpy arrays (numpy 1.x and 2.x module names;
# _frombuffer is how numpy pickles an array at protocol 5), the dtype, and what Python 3 writes
# for bytes at protocols 0-2. Dicts, lists, strings and numbers need no global at all.
PICKLE_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("_codecs", "encode"), ("__builtin__", "bytes"), ("builtins", "bytes"),
})  # fmt: skip


class CifarUnpickler(pickle.Unpickler):
    """An unpickler that admits only what a CIFAR batch holds, so reading one never runs code.

    ``pickle.load`` calls whatever callable a file names (``os.system``, ``builtins.open``, ...);
    this one refuses every global outside :data:`PICKLE_GLOBALS` before it is looked up, with a
    :class:`DataError` naming the file and the global.
    """

    def __init__(self, file, path: Path, what: str = "CIFAR-10", fix: str = "download CIFAR-10 again"):
        super().__init__(file, encoding="latin1")  # the original batches were written by Python 2
        self.path, self.what, self.fix = path, what, fix

    def find_class(self, module: str, name: str):
        if (module, name) not in PICKLE_GLOBALS:
            raise DataError(
                f"{self.path} refers to {module}.{name}, which a {self.what} batch never holds (only dicts, lists, "
                f"strings, numbers and numpy arrays); refused, nothing in it was run. Delete "
                f"{self.path.parent} and {self.fix} (data.download=true)"
            )
        return super().find_class(module, name)


def load_pickle(path: Path, what: str = "CIFAR-10", fix: str = "download CIFAR-10 again") -> object:
    """One CIFAR pickle (a batch or its meta file), read with :class:`CifarUnpickler`."""
    with open(path, "rb") as f:
        return CifarUnpickler(f, path, what, fix).load()
