"""``normsweep`` / ``python -m normsweep [-m] [group=option ...] [key=value ...]``: the training entrypoint.

The configs are the package ``normsweep.conf`` (``conf/`` in the repo, see pyproject.toml); ``--config-dir DIR``
adds a directory of your own configs beside them.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from normsweep.base.credentials import has_password, refusal, secret_arguments
from normsweep.config import NormsweepError, register_configs
from normsweep.run.job import run

register_configs()
log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="pkg://normsweep.conf", config_name="train")
def main(cfg: DictConfig) -> float:
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    if not multirun and cfg.get("search") is not None:  # without -m, Hydra's sweeper (the search) never runs
        choice = HydraConfig.get().runtime.choices.get("search")
        log.error("search=%s searches in a multirun: add -m (python -m normsweep -m search=%s ...). Without it this "
                  "would be one training run at the current settings, not a search", choice, choice)  # fmt: skip
        sys.exit(2)
    try:
        return run(cfg)
    except KeyboardInterrupt:
        if multirun:
            raise  # stops the sweep; finished jobs keep their results
        sys.exit(130)  # run() logged how to resume
    except Exception as e:
        if multirun:
            # run() recorded the failure in results.json and the log. Returning (not raising) lets
            # the other jobs run and the end-of-sweep report list this one; the report's callback
            # makes the sweep exit non-zero.
            return float("nan")
        if isinstance(e, NormsweepError):
            sys.exit(2)  # a problem the user can fix: run() logged its message; no traceback
        if has_password("".join(traceback.format_exception(e))):  # a client's error quoting its URL
            sys.exit(1)  # Hydra would print it as is; run() logged it masked, results.json has the traceback
        raise


def require_configs() -> None:
    """Stop with the fix when the configs cannot be found: a checkout used without ``pip install``.

    ``conf/`` becomes the package ``normsweep.conf`` only through the install (pyproject.toml's
    package-dir); ``PYTHONPATH=.`` or ``cd`` into a clone imports normsweep but not its configs,
    and Hydra's own message ("Primary config module 'normsweep.conf' not found") does not say why.
    """
    if importlib.util.find_spec("normsweep.conf") is None:
        here = Path(__file__).resolve().parent
        print(f"normsweep: its configs (the package normsweep.conf) are not installed: normsweep is imported "
              f"from {here}, a checkout that was not installed. Install it, then run again:\n"
              f"    pip install -e {here.parent}", file=sys.stderr)  # fmt: skip
        sys.exit(2)


def refuse_secret_arguments(argv: list[str]) -> None:
    """Stop (exit status 2) before Hydra reads the command line if an argument is or holds a secret
    (:mod:`normsweep.base.credentials`): Hydra would quote an override it cannot parse in its error."""
    found = secret_arguments(argv)
    if found:
        print(f"normsweep: {refusal(found)}", file=sys.stderr)
        sys.exit(2)


def cli() -> None:
    """``normsweep`` = ``python -m normsweep``: the checks before Hydra, then :func:`main`."""
    require_configs()
    refuse_secret_arguments(sys.argv[1:])
    main()


if __name__ == "__main__":
    cli()
