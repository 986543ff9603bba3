"""Hydra discovers sweepers in the ``hydra_plugins`` namespace; this registers normsweep's.

The implementation is :mod:`normsweep.search.sweeper`. Select it with ``search=optuna`` (which sets
``hydra/sweeper=normsweep_optuna``).
"""

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore

from normsweep.search.sweeper import OptunaSweeper


class NormsweepOptunaSweeper(OptunaSweeper):
    """Hydra only instantiates plugin classes defined under hydra_plugins."""


@dataclass
class NormsweepOptunaSweeperConf:
    _target_: str = "hydra_plugins.normsweep_optuna_sweeper.NormsweepOptunaSweeper"


ConfigStore.instance().store(
    group="hydra/sweeper", name="normsweep_optuna", node=NormsweepOptunaSweeperConf, provider="normsweep"
)
