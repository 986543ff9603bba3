"""The errors a user can fix. Each message names the key or file, what was expected, and the fix."""

from __future__ import annotations


class NormsweepError(Exception):
    """A problem the user can fix (config, data, budget); its message names the key or file and the fix."""


class ConfigError(NormsweepError, ValueError):
    """A config value that cannot work."""


def one_line(error: BaseException) -> str:
    """``ValueError: the first line of its message``: how a log line, a trial's ``error`` attribute or a
    worker's summary names an exception."""
    return f"{type(error).__name__}: {error}".splitlines()[0]
