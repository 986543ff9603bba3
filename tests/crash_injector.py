"""Loaded into a normsweep process (as ``sitecustomize``) to kill it at an exact point of a write or of training.

``NORMSWEEP_TEST_KILL_AT=NAME:N:STAGE`` kills the process during its N-th atomic write of the file
called NAME (``results.json``, ``checkpoint.pt``, ``model.pt``, or a prefix such as ``cifar10-``
for the data cache), at STAGE:

* ``mid-write``     - the temporary file is half on disk (cut to half its size), as after a power
                      cut while the bytes were still being written; the kill comes before its fsync;
* ``before-rename`` - the temporary file is complete and synced, not yet renamed onto NAME;
* ``after-rename``  - the rename happened, the directory was not yet synced.
* ``term-after-rename`` - as ``after-rename``, but the process sends itself ``SIGTERM`` instead of
                      ``SIGKILL``: its handler runs the moment the file is in place.

For a file that is appended to (Optuna's journal, NAME ``study.journal``), the N-th record
appended to it (counting only records that contain ``NORMSWEEP_TEST_RECORD``, if set) is cut to
its first half on disk, as a write stopped part-way leaves it, before its fsync; then, at STAGE:

* ``mid-append``    - the kill (the writer still holds the journal's lock);
* ``enospc-append`` - the fsync raises ``OSError(ENOSPC)``, as a full disk does, and the process goes on.

The kill is a real ``SIGKILL`` of the process by itself: no handler, no ``finally`` block runs.
Nothing here is imported by normsweep; tests put this file on ``PYTHONPATH`` as sitecustomize.py.

``NORMSWEEP_TEST_KILL_AT=step:N:STAGE`` acts at the process's N-th training step (the optimizer's
step, counted over the process's life, through every job of a multirun), at STAGE:

* ``kill`` - the kill, as above;
* ``park`` - training stops there for good: other threads (a trial's heartbeats) run on, and a
             signal's handler still runs (SIGTERM's raises out of the step); the test does what it
             tests to this live run, then kills it;
* ``hold`` - as ``park``, until the test releases every held process (:func:`release`);
* ``exit-term`` - ``SystemExit(-1)`` raised there, as submitit's handler of a time limit or a
             preemption (``SIGUSR2``) does once it has requeued the job; then a real ``SIGTERM``, as
             the requeue sends, at the process's next write of ``results.json`` (the run recording
             that stop), just before the file is renamed into place.

A parked or held process says so with a file in ``NORMSWEEP_TEST_PARK_DIR`` (:func:`wait_parked`).
Kill and park points are progress, not time: they land in a live run however fast the machine is.
The functions at the end are the tests' side.
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
    _term_at_next_record = [False]  # armed by the step stage exit-term

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
        if _term_at_next_record[0] and os.path.basename(str(dst)) == "results.json":
            _term_at_next_record[0] = False
            os.kill(os.getpid(), signal.SIGTERM)  # its handler runs here, before the rename
        if _stage in ("before-rename", "after-rename", "term-after-rename") and _is_target(dst) \
                and str(src).endswith(".tmp"):  # fmt: skip
            _seen["replace"] += 1
            if _seen["replace"] == _n:
                if _stage == "before-rename":
                    _die()
                _real_replace(src, dst, *args, **kwargs)
                if _stage == "term-after-rename":  # SIGTERM's handler runs as soon as the rename returns
                    os.kill(os.getpid(), signal.SIGTERM)
                    return None
                _die()
        return _real_replace(src, dst, *args, **kwargs)

    os.fsync, os.replace = fsync, replace


# ------------------------------------------------------------------ progress points: training steps

KILL_AT_VAR, PARK_DIR_VAR = "NORMSWEEP_TEST_KILL_AT", "NORMSWEEP_TEST_PARK_DIR"
RELEASE = "release"  # in the park directory: held processes go on


def _parked_file(park_dir, pid: int) -> str:  # noqa: ANN001
    return os.path.join(park_dir, f"parked.{pid}")


if _spec and _name == "step":
    import time

    from torch.optim.optimizer import register_optimizer_step_pre_hook  # normsweep imports torch anyway

    assert _stage in ("kill", "park", "hold", "exit-term"), (
        f"{KILL_AT_VAR}={_spec}: a step's stage is kill, park, hold or exit-term"
    )
    _steps = 0

    def _at_step(optimizer, args, kwargs) -> None:  # noqa: ANN001 - torch's optimizer step pre-hook
        global _steps
        _steps += 1
        if _steps != _n:
            return
        if _stage == "kill":
            _die()
        if _stage == "exit-term":
            _term_at_next_record[0] = True
            raise SystemExit(-1)
        park_dir = os.environ[PARK_DIR_VAR]
        open(_parked_file(park_dir, os.getpid()), "w").close()
        while _stage == "park" or not os.path.exists(os.path.join(park_dir, RELEASE)):
            time.sleep(0.05)  # interruptible: a signal's handler runs

    register_optimizer_step_pre_hook(_at_step)


# ------------------------------------------------------------------ the tests' side


def injector_dir(tmp_path):  # noqa: ANN001, ANN201 - pathlib is not imported into every child
    """``tmp_path/injector``, holding this file as ``sitecustomize.py``: the ``PYTHONPATH`` that loads it.

    It is also the park directory of the processes started with :func:`env`.
    """
    import shutil
    from pathlib import Path

    d = Path(tmp_path) / "injector"
    d.mkdir(exist_ok=True)
    shutil.copy(__file__, d / "sitecustomize.py")
    return d


def env(shim, spec: str) -> dict:  # noqa: ANN001
    """``os.environ`` for a process that loads the injector from ``shim`` (:func:`injector_dir`) with ``spec``."""
    base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**base, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(shim), KILL_AT_VAR: spec, PARK_DIR_VAR: str(shim)}


def wait_parked(proc, shim, timeout: float = 600, log=None) -> None:  # noqa: ANN001
    """Wait until ``proc``, started with ``env(shim, "step:N:park")`` (or ``hold``), is parked; fail if it ends first.

    The wait is on the process's progress; ``timeout`` only bounds a hang. The failure shows the
    process's output: its stdout pipe's, or the file ``log``'s.
    """
    from .slurm_cluster import wait_for

    def parked() -> bool:
        if proc.poll() is not None:
            out = proc.communicate()[0] if proc.stdout else (open(log).read() if log else "")
            raise AssertionError(f"the process ended (exit {proc.returncode}) before its park point:\n{out[-3000:]}")
        return os.path.exists(_parked_file(shim, proc.pid))

    wait_for(parked, timeout, "the process's park point", interval=0.05)


def release(shim) -> None:  # noqa: ANN001
    """Let every process held at a ``step:N:hold`` point in ``shim`` go on."""
    open(os.path.join(shim, RELEASE), "w").close()


def steps_per_epoch(images: int, args) -> int:  # noqa: ANN001
    """The training steps of an epoch of a run on ``images`` images, with the CLI overrides ``args``.

    ``args`` must set ``data.val_size`` (held out of the ``images``) and ``trainer.batch_size``.
    """
    from normsweep.run.train import images_per_epoch

    given = dict(a.split("=", 1) for a in args if "=" in a)
    batch = int(given["trainer.batch_size"])
    return -(-images_per_epoch(images - int(given["data.val_size"]), batch) // batch)
