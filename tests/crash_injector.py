"""Loaded into a normsweep process (as ``sitecustomize``) to SIGKILL it at one exact point of a write.

``NORMSWEEP_TEST_KILL_AT=NAME:N:STAGE`` kills the process during its N-th atomic write of the file
called NAME (``results.json``, ``checkpoint.pt``, ``model.pt``, or a prefix such as ``cifar10-``
for the data cache), at STAGE:

* ``mid-write``     - the temporary file is half on disk (cut to half its size), as after a power
                      cut while the bytes were still being written; the kill comes before its fsync;
* ``before-rename`` - the temporary file is complete and synced, not yet renamed onto NAME;
* ``after-rename``  - the rename happened, the directory was not yet synced.

For a file that is appended to (Optuna's journal, NAME ``study.journal``), the N-th record
appended to it (counting only records that contain ``NORMSWEEP_TEST_RECORD``, if set) is cut to
its first half on disk, as a write stopped part-way leaves it, before its fsync; then, at STAGE:

* ``mid-append``    - the kill (the writer still holds the journal's lock);
* ``enospc-append`` - the fsync raises ``OSError(ENOSPC)``, as a full disk does, and the process goes on.

The kill is a real ``SIGKILL`` of the process by itself: no handler, no ``finally`` block runs.
Nothing here is imported by normsweep; tests put this file on ``PYTHONPATH`` as sitecustomize.py.
"""

import errno
import os
import signal

_spec = os.environ.get("NORMSWEEP_TEST_KILL_AT")
if _spec:
    _name, _n, _stage = _spec.split(":")
    _n = int(_n)
    _seen = {"fsync": 0, "replace": 0, "append": 0}
    _record_text = os.environ.get("NORMSWEEP_TEST_RECORD", "").encode()
    _real_fsync, _real_replace = os.fsync, os.replace

    def _die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def _is_target(path: str) -> bool:
        base = os.path.basename(str(path))
        return base.startswith(_name) or base.startswith("." + _name)

    def _tear_last_record(fd: int, path: str) -> bool:
        """Cut the record just appended to ``path`` to its first half, if it is the one to tear."""
        with open(path, "rb") as f:
            data = f.read()
        start = data.rfind(b"\n", 0, len(data) - 1) + 1
        if _record_text not in data[start:]:
            return False
        _seen["append"] += 1
        if _seen["append"] != _n:
            return False
        os.ftruncate(fd, start + (len(data) - start) // 2)
        return True

    def fsync(fd):  # noqa: ANN001 - same signature as os.fsync
        try:
            path = os.readlink(f"/proc/self/fd/{fd}") if isinstance(fd, int) else ""
        except OSError:
            path = ""
        if _stage in ("mid-append", "enospc-append") and not path.endswith(".tmp") and _is_target(path):
            if _tear_last_record(fd, path):
                if _stage == "mid-append":
                    _die()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if _stage == "mid-write" and path.endswith(".tmp") and _is_target(path):
            _seen["fsync"] += 1
            if _seen["fsync"] == _n:
                os.ftruncate(fd, os.fstat(fd).st_size // 2)
                _die()
        return _real_fsync(fd)

    def replace(src, dst, *args, **kwargs):  # noqa: ANN001
        if _stage in ("before-rename", "after-rename") and _is_target(dst) and str(src).endswith(".tmp"):
            _seen["replace"] += 1
            if _seen["replace"] == _n:
                if _stage == "before-rename":
                    _die()
                _real_replace(src, dst, *args, **kwargs)
                _die()
        return _real_replace(src, dst, *args, **kwargs)

    os.fsync, os.replace = fsync, replace
