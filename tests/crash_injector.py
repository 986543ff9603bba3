"""Loaded into a normsweep process (as ``sitecustomize``) to SIGKILL it at one exact point of a write.

``NORMSWEEP_TEST_KILL_AT=NAME:N:STAGE`` kills the process during its N-th atomic write of the file
called NAME (``results.json``, ``checkpoint.pt``, ``model.pt``, or a prefix such as ``cifar10-``
for the data cache), at STAGE:

* ``mid-write``     - the temporary file is half on disk (cut to half its size), as after a power
                      cut while the bytes were still being written; the kill comes before its fsync;
* ``before-rename`` - the temporary file is complete and synced, not yet renamed onto NAME;
* ``after-rename``  - the rename happened, the directory was not yet synced.

The kill is a real ``SIGKILL`` of the process by itself: no handler, no ``finally`` block runs.
Nothing here is imported by normsweep; tests put this file on ``PYTHONPATH`` as sitecustomize.py.
"""

import os
import signal

_spec = os.environ.get("NORMSWEEP_TEST_KILL_AT")
if _spec:
    _name, _n, _stage = _spec.split(":")
    _n = int(_n)
    _seen = {"fsync": 0, "replace": 0}
    _real_fsync, _real_replace = os.fsync, os.replace

    def _die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def _is_target(path: str) -> bool:
        base = os.path.basename(str(path))
        return base.startswith(_name) or base.startswith("." + _name)

    def fsync(fd):  # noqa: ANN001 - same signature as os.fsync
        try:
            path = os.readlink(f"/proc/self/fd/{fd}") if isinstance(fd, int) else ""
        except OSError:
            path = ""
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
