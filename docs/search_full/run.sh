#!/usr/bin/env bash
# The full-fidelity search (issue 19), resumable: run it again and it continues where it stopped.
# Round-robin: each round tops every study up by STEP trials, so all three advance together.
#   nohup docs/search_full/run.sh > ../runs/search_full.log 2>&1 &
# Environment: TRIALS (total per study, 24), STEP (2), THREADS (torch threads per trial, 1),
# DATA (../shared/data/cifar10-jpg), RUNS (where the trial job directories go, ../runs/search_full),
# STORAGE (the study file, default the preset's journal:docs/search_full/optuna.journal; an absolute
# journal:PATH lets a checkout of a fixed commit, e.g. a `git worktree`, run the search while the
# code in the main checkout changes), WORKERS (search workers per study at a time, 1; more run as
# joblib processes: on one GPU, WORKERS=6 STEP=24 trains six trials at a time and a study's 24 in
# four rounds), DEVICE (trainer.device, auto), TRIALS_<norm> (one study's total, TRIALS by default: a trial that
# failed on its own, not through a stopped worker, keeps its slot, so TRIALS_group=26 gives the group study, which has
# two such failures, its 24 finished ones). Arguments are further overrides for every command.
set -u
cd "$(dirname "$0")/../.."
TRIALS=${TRIALS:-24} STEP=${STEP:-2} THREADS=${THREADS:-1}
DATA=${DATA:-../shared/data/cifar10-jpg} RUNS=${RUNS:-../runs/search_full}
STORAGE=${STORAGE:-journal:docs/search_full/optuna.journal}
PY=${PY:-python} WORKERS=${WORKERS:-1} DEVICE=${DEVICE:-auto}
launch=()
[ "$WORKERS" -gt 1 ] && launch=("search.workers=$WORKERS" hydra/launcher=joblib "hydra.launcher.n_jobs=$WORKERS")
most=$TRIALS
for norm in group layer batch; do var="TRIALS_$norm"; [ "${!var:-$TRIALS}" -gt "$most" ] && most=${!var}; done
for n in $(seq "$STEP" "$STEP" "$((most + STEP - 1))"); do
  for norm in group layer batch; do
    var="TRIALS_$norm"; total=${!var:-$TRIALS}
    if [ "$n" -le "$total" ]; then n_study=$n
    elif [ "$((n - STEP))" -lt "$total" ]; then n_study=$total  # the last round tops this study up
    else continue; fi
    extra=()
    [ "$norm" = group ] && extra=('norm.groups=tag(search, choice(2, 4))')
    echo "=== $(date -Is) round to $n_study trials: $norm"
    # search.max_failure_rate=0.7: the group study's trials 1 and 3 failed on infrastructure (a config changed under
    # a running worker; the retry of trial 2 refused its checkpoint, written by older code), which left it at 2 of 3
    # failed, over the default 0.5, so the study would stop for good. One more finished trial brings it to 0.5.
    "$PY" -m normsweep -m experiment=search_full "norm=$norm" "${extra[@]}" "search.n_trials=$n_study" "search.storage=$STORAGE" \
      search.max_failure_rate=0.7 \
      "trainer.threads=$THREADS" "trainer.device=$DEVICE" "${launch[@]}" "data.root=$DATA" "hydra.sweep.dir=$RUNS/$norm" "$@" \
      || echo "=== $(date -Is) $norm round $n_study exited with $?"
    # The evidence beside the journal, current after every study's round (optimization_results, trials.md, plots).
    [ "${STORAGE#journal:}" != "$STORAGE" ] && "$PY" -m normsweep.studies "$STORAGE" --out "$(dirname "${STORAGE#journal:}")" > /dev/null
  done
done
