"""normsweep/search/internals.py: each reach beyond Optuna's and Hydra's public API works with the installed
versions. An upgrade that moves one fails here, naming it, instead of deep inside a search."""

from __future__ import annotations

import optuna
from hydra.core.utils import JobReturn, JobStatus

from normsweep.search import internals


def test_a_studys_storage_and_ids_reach_another_workers_trial() -> None:
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage(), study_name="s")
    trial = study.ask()
    storage = internals.study_storage(study)
    assert isinstance(storage, optuna.storages.BaseStorage)
    sid = internals.study_id(study)
    assert storage.get_trial_id_from_study_id_trial_number(sid, trial.number) == internals.trial_id(trial)
    frozen = storage.get_trial(internals.trial_id(trial))
    assert internals.trial_id(frozen) == internals.trial_id(trial) and frozen.number == trial.number
    storage.set_trial_system_attr(internals.trial_id(frozen), "normsweep:test", 1)
    assert study.trials[0].system_attrs["normsweep:test"] == 1
    assert internals.study_id(storage.get_all_studies()[0]) == sid


def test_the_journal_operation_codes_name_what_the_tail_check_reads() -> None:
    ops = internals.journal_operations()
    assert {"CREATE_STUDY", "CREATE_TRIAL", "SET_TRIAL_STATE_VALUES", "SET_TRIAL_SYSTEM_ATTR"} <= set(ops.__members__)


def test_hydras_basic_launcher_and_a_failed_jobs_error() -> None:
    from hydra.plugins.launcher import Launcher

    assert issubclass(internals.basic_launcher_class(), Launcher)
    error = ValueError("boom")
    ret = JobReturn(status=JobStatus.FAILED, _return_value=error)
    assert internals.job_error(ret) is error
