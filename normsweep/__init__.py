"""normsweep: run and compare normalization experiments (Batch/Group/Layer Norm) on CIFAR-10.

Where things are: the README's "Code map". Following ``norm.kind`` from config to layer:
``conf/norm/<kind>.yaml`` -> ``config.NormConfig`` -> ``run.build.model_from_config`` ->
``norms.NORMS[kind]``.
"""

__version__ = "0.1.0"
