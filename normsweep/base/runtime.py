"""The machine a run uses: device, torch threads, bf16 autocast, malloc setting, peak memory.

Imports nothing else of normsweep, so the job, the training loop and the benchmark share it
without a cycle.
"""

from __future__ import annotations

import functools
import os
from contextlib import nullcontext
from pathlib import Path

import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"trainer.device={name} but PyTorch sees no CUDA GPU; pass trainer.device=cpu")
    return torch.device(name)


def job_threads(threads: int | None, jobs_at_once: int | None = None) -> int | None:
    """Torch threads for this job: ``trainer.threads``, or the job's share of the cores.

    With ``trainer.threads=null`` a job under a parallel launcher gets ``cpus_per_task`` threads
    (submitit) or ``cores // n_jobs`` (joblib; ``n_jobs=-1`` is one job per core), so parallel
    jobs do not oversubscribe the cores; otherwise torch keeps its default (all cores).
    ``jobs_at_once`` caps joblib's count: the trials of a search run inside its ``search.workers``
    worker jobs, so only that many run together even when ``n_jobs`` is larger.
    """
    from hydra.core.hydra_config import HydraConfig

    if threads or not HydraConfig.initialized():
        return threads
    launcher = HydraConfig.get().launcher
    if launcher.get("cpus_per_task"):
        return int(launcher.cpus_per_task)
    if launcher.get("n_jobs"):
        parallel = launcher_jobs_at_once(launcher)
        return max(1, usable_cores() // min(parallel, jobs_at_once or parallel))
    return None


def usable_cores() -> int:
    """The cores this process may run on (its affinity, where the OS tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def launcher_jobs_at_once(launcher) -> int | None:
    """How many jobs a launcher config (``hydra.launcher``) runs together, where it caps them.

    joblib: ``n_jobs`` (``-1`` = one per core, ``-2`` all but one); submitit_slurm:
    ``array_parallelism``; None for the others (``submitit_local`` starts every job at once).
    """
    n_jobs = launcher.get("n_jobs")
    if n_jobs:
        return n_jobs if n_jobs > 0 else max(1, usable_cores() + 1 + n_jobs)
    return launcher.get("array_parallelism") or None


def keep_freed_memory() -> bool:
    """Make glibc's malloc reuse freed blocks instead of returning them to the OS (Linux).

    By default glibc serves every allocation above 32 MB (one fp32 activation of a 16-channel
    32x32 map at batch 512 is 33.5 MB) with a fresh ``mmap`` and unmaps it on free, so each
    training step page-faults its activations in again; that measured 15-35% of an fp32 CPU step.
    Turning ``mmap`` off (the heap then grows instead, falling back to ``mmap`` only if it cannot)
    and not trimming the heap does what jemalloc/tcmalloc via LD_PRELOAD do, in-process. Returns
    whether it applied; a no-op on other C libraries.
    """
    import ctypes

    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
        m_trim_threshold, m_mmap_max = -1, -4  # glibc's mallopt parameter numbers
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**30))
    except (OSError, AttributeError):
        return False


@functools.lru_cache(maxsize=None)  # the job and the training loop both ask; read /proc/cpuinfo once
def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), from /proc/cpuinfo's flags."""
    try:
        text = Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo
        flags = next(line for line in text.splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False  # not Linux, or no flags line: assume no native bf16
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split(":", 1)[-1].split()))


def use_bf16(setting: bool | None, device: torch.device) -> bool:
    """``trainer.bf16``: true/false as given; null = on for GPUs and CPUs with native bf16.

    On CPUs without it, bf16 is emulated and slower than fp32, so auto leaves it off there.
    """
    if setting is not None:
        return setting
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_native_bf16()


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on ``device`` if ``enabled``, else a context that does nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else nullcontext()


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this run so far: max allocated on a GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024
