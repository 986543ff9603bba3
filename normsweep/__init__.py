"""normsweep: run and compare normalization experiments (Batch/Group/Layer Norm) on CIFAR-10.

Where things are: the README's "Code map". Following ``norm.kind`` from config to layer:
``conf/norm/<kind>.yaml`` -> ``config.NormConfig`` -> ``run.build.model_from_config`` ->
``norms.NORMS[kind]``.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``normsweep.swap_norms`` (any model, its norms swapped: :mod:`normsweep.models.swap`), imported on first
    use so that ``import normsweep.<part>`` does not load torch for the commands that do not need it."""
    if name == "swap_norms":
        from normsweep.models.swap import swap_norms

        return swap_norms
    raise AttributeError(f"module 'normsweep' has no attribute {name!r}")
