"""The Optuna search, as one story.

``python -m normsweep -m search=optuna ...`` selects the Hydra sweeper (``sweeper``), which turns
the command line into studies (one per grid point of the non-searched sweeps; the search space is
``search.params``), then starts ``search.workers`` worker jobs through whatever launcher is
configured (local, joblib, Slurm). Each worker (``worker``) loops: take a trial slot of a study under
a cross-worker lock so that together the workers run exactly ``search.n_trials`` per study
(``trials.take_trial``), run the trial's job in its own process with pruning, tell the result, take
the next. A worker stopped by SIGTERM frees its slot; one killed outright stops its heartbeats and
the next worker fails its trial after ``search.grace_period`` and retries its parameters from the
checkpoint (``trials.free_slot``). The storage is any SQLAlchemy URL or an Optuna journal file
(``storage``), whose torn tail is cut and whose damage is repaired (``journal``). What the studies
hold (best settings, every trial, Optuna's plots) is written at the end and by
``python -m normsweep.studies`` (``studies``).

Modules: ``trials`` (space, study names, pruners, trial slots), ``sweeper``, ``worker``,
``storage``, ``journal``, ``studies``.
"""
