"""The one place where normsweep reaches into Optuna and Hydra beyond their public API.

A search worker must change *another* worker's trial (fail a stale one, mark it stale, beat for its own
while the job runs in-process), which Optuna's public ``Study``/``Trial`` API does not offer: it goes
through the study's storage with the trial's storage id. The journal's torn-record check needs the
journal's operation codes. The sweeper must tell Hydra's basic launcher (which runs jobs one after
another) from launchers that run them at once. Each reach is one function here, and
``tests/test_internals.py`` calls each against the installed versions, so an upgrade that moves one
fails there, naming it, not somewhere deep in a search.
"""

from __future__ import annotations

from typing import Any


def study_storage(study: Any) -> Any:
    """The ``optuna.storages.BaseStorage`` a ``Study`` reads and writes (``study._storage``)."""
    return study._storage


def study_id(study: Any) -> int:
    """The storage id of a ``Study`` or a ``FrozenStudy`` (``_study_id``)."""
    return study._study_id


def trial_id(trial: Any) -> int:
    """The storage id of a ``Trial`` or a ``FrozenTrial`` (``_trial_id``; ``number`` counts within its study)."""
    return trial._trial_id


def journal_operations() -> Any:
    """Optuna's journal operation codes (``optuna.storages.journal._storage.JournalOperation``)."""
    from optuna.storages.journal._storage import JournalOperation

    return JournalOperation


def basic_launcher_class() -> type:
    """Hydra's default launcher, which runs a sweep's jobs one after another in this process."""
    from hydra._internal.core_plugins.basic_launcher import BasicLauncher

    return BasicLauncher


def job_error(ret: Any) -> BaseException:
    """The exception a failed Hydra job raised (``JobReturn._return_value``). The public ``return_value``
    re-raises it after writing "Error executing job with overrides: ..." to stderr, which a worker that
    has already logged the failure (and recorded it in the trial) does not want."""
    return ret._return_value
