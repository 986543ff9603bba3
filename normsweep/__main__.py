"""``python -m normsweep [-m] [group=option ...] [key=value ...]``: the training entrypoint."""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from .config import NormsweepError, register_configs
from .job import run

register_configs()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    try:
        return run(cfg)
    except NormsweepError:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # Hydra records this job as failed and runs the others
        sys.exit(2)  # a problem the user can fix: run() logged its message; no traceback


if __name__ == "__main__":
    main()
