"""SIGTERM stops a run or a search worker as Ctrl-C does: the code it interrupts records what it was doing.

``scancel``, ``scontrol requeue``, a batch system's preemption and ``kill`` send SIGTERM; Python's
default would end the process on the spot, leaving a run "running" and a trial RUNNING. Imports
nothing heavy, so the sweeper uses it without loading the training code.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading

log = logging.getLogger(__name__)


class RunInterrupted(KeyboardInterrupt):
    """SIGTERM: handled like Ctrl-C — stop, keep the last epoch's checkpoint, say how to resume."""


@contextlib.contextmanager
def sigterm_interrupts():
    """While the block runs, SIGTERM raises :class:`RunInterrupted` where the main thread is, as Ctrl-C does.

    Signal handlers can only be set from the main thread; elsewhere (a thread-based launcher) the
    block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum, frame):
        raise RunInterrupted(f"stopped by signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stop_reason(e: BaseException) -> str:
    """``Type: message`` of what stopped a run or a search worker; a bare Ctrl-C says so."""
    return f"{type(e).__name__}: {str(e) or ('Ctrl-C' if isinstance(e, KeyboardInterrupt) else 'no message')}"


@contextlib.contextmanager
def stopping_uninterrupted():
    """While the block runs, SIGTERM and Ctrl-C are logged, not raised: the code is already stopping and
    the block records why (a run's results.json, a trial's state).

    A second signal is common: submitit's handler for a time limit or a preemption (``SIGUSR2``)
    requeues the job, which SIGTERMs it while the first stop is being written down. Raised there,
    it would cut the record short. Main thread only, as :func:`sigterm_interrupts`.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def note(signum, frame):
        log.warning("%s while stopping: finishing the record first", signal.Signals(signum).name)

    previous = {s: signal.signal(s, note) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
