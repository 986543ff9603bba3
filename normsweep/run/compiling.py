"""How a training step is compiled: the registry :data:`COMPILE_MODES` (``trainer.compile``), named for what
each mode does rather than for torch's option string.

A small network like the study's (under 50,000 parameters) is bound by kernel launches and Python on a GPU,
not by arithmetic: ``kernels`` fuses the step's element-wise work into fewer kernels (torch.compile's
default mode); ``graphs`` also records the forward and backward pass as CUDA graphs and replays each with
one launch (torch's ``reduce-overhead``; on a CPU there are no graphs and it is ``kernels``). A graph
replays fixed shapes, so the graph modes need batches of one size: ``trainer.drop_last=true`` leaves out
each epoch's last, partial batch (the schema refuses a graph mode without it, so that the setting that
changes the numbers is written in the config, and is the same for every norm of a sweep). ``autotune`` and ``autotune_graphs`` also search kernel configurations (minutes of
compiling; worth it only for long runs). This module imports nothing of normsweep above ``base``, so the
schema can read it.
"""

from __future__ import annotations

from dataclasses import dataclass

from normsweep.base.registry import Registry


@dataclass(frozen=True)
class CompileMode:
    torch_mode: str  # torch.compile(mode=...)
    graphs: bool  # replays CUDA graphs: needs batches of one shape
    what: str  # one line for the docs and the error that lists the modes


COMPILE_MODES: Registry[CompileMode] = Registry("trainer.compile")
COMPILE_MODES.register("kernels", CompileMode("default", False, "fused kernels (torch.compile's default mode)"))
COMPILE_MODES.register(
    "graphs", CompileMode("reduce-overhead", True, "fused kernels replayed as CUDA graphs, one launch per pass")
)
COMPILE_MODES.register(
    "autotune", CompileMode("max-autotune-no-cudagraphs", False, "fused kernels with autotuned configurations")
)
COMPILE_MODES.register("autotune_graphs", CompileMode("max-autotune", True, "autotuned kernels as CUDA graphs"))

# torch's own option strings, which trainer.compile took before the modes were named: refused with the new name.
TORCH_MODE_NAMES = {mode.torch_mode: name for name, mode in COMPILE_MODES.items()}
