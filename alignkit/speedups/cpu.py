"""The process phase on a CPU run: intra-op threads fitted to the cores other jobs leave free, and glibc's allocator
kept from returning freed tensor memory to the OS (``mallopt`` through ctypes). Both change process-wide state, so
only :func:`alignkit.speedups.apply` calls them, once per run (never a config object). Thread counts change float
summation order only (within the golden tolerances); the allocator changes no number at all.
"""

from __future__ import annotations

import os

from alignkit.runtime import env_choice, gpu_available


def physical_cores() -> int:
    """Physical cores this process may run on: psutil's count (hyper-threads excluded), capped by the CPU affinity
    mask (a container or ``taskset`` may allow fewer)."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or allowed
    except ImportError:
        physical = allowed
    return max(1, min(physical, allowed))


def busy_cores(interval: float = 0.25) -> float | None:
    """Cores' worth of CPU time the whole machine used over the next ``interval`` seconds (logical cores; from
    /proc/stat's first line: user, nice, system, irq, softirq and steal count as busy, idle and iowait not), or None
    where there is no /proc/stat. The caller sleeps meanwhile, so it counts everything else."""
    import time

    def snapshot() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
        return sum(fields), fields[3] + fields[4]

    try:
        (total_0, idle_0), _, (total_1, idle_1) = snapshot(), time.sleep(interval), snapshot()
    except (OSError, ValueError, IndexError):
        return None
    if total_1 <= total_0:
        return None
    return (1 - (idle_1 - idle_0) / (total_1 - total_0)) * (os.cpu_count() or 1)


def fit_cpu_threads() -> int | None:
    """Intra-op threads for a CPU run: this rank's share of the physical cores that are not already busy.

    An OpenMP team waits at the end of every parallel region for its slowest thread; when the machine has more
    runnable threads than cores, a thread the scheduler has parked stalls the whole team for a time slice at each of
    the thousands of ops in a step. Measured on a 2-core machine kept busy by other jobs (load average 5.4): the tiny
    SFT benchmark ran 25232 tokens/s with 1 thread and 536 with 2 (47x; benchmarks/README.md). So the count is
    min(physical cores / ranks on this machine, physical cores - the load others put on it) and at least 1, where
    the others' load is the 1-minute load average minus this machine's ranks (each was runnable while it loaded its
    model and data), capped by what the machine is busy with now (:func:`busy_cores`, minus this machine's other
    ranks): the average lags by a minute, so a run started right after another saw that one as a neighbour and took
    1 thread of 2 (benchmarks/README.md). Several ranks on one machine also split the cores (the launchers' own fallback,
    ``OMP_NUM_THREADS=1`` from torchrun or accelerate 1.15 without ``--cpu``, leaves all but N cores idle).

    Kept as they are: GPU runs, an ``OMP_NUM_THREADS`` the user set (any value for a single process, above 1 for
    several ranks), and counts above torch's own. Thread counts change float summation order only (1 vs 2 threads:
    within the golden tolerances, ``tests/regression/spread.py``). Returns the count set, or None."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    omp = os.environ.get("OMP_NUM_THREADS")
    if gpu_available() or (omp is not None and (local <= 1 or omp != "1")):
        return None
    import torch

    cores = physical_cores()
    try:
        others = max(0.0, os.getloadavg()[0] - local)
    except OSError:
        others = 0.0
    if others > 0 and (busy := busy_cores()) is not None:
        # the load average lags by about a minute (a run started right after another one sees that one's load):
        # others are busy only if the machine is busy now, too (this rank sleeps while it is sampled). Counted in
        # busy logical CPUs, like the load average in runnable threads: not scaled down by hyper-threads per core
        # (the scheduler spreads busy threads over the physical cores first, so 3 busy of 8 logical on 4 physical
        # cores leave 1 core, not 2.5)
        others = min(others, max(0.0, busy - (local - 1)))
    threads = max(1, min(cores // local, int(cores - others + 0.5)))
    if local <= 1 and threads >= torch.get_num_threads():
        return None
    torch.set_num_threads(threads)
    global _FITTED
    _FITTED = threads
    return threads


_FITTED: int | None = None


def fitted_threads() -> int | None:
    """The count :func:`fit_cpu_threads` set in this process, if it still holds (a later run keeps it)."""
    import torch

    return _FITTED if _FITTED is not None and torch.get_num_threads() == _FITTED else None


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def fit_cpu_allocator() -> bool:
    """Keep freed tensor memory in the process on a CPU run (glibc only): no ``mmap`` per allocation, no trimming
    of the heap, one malloc arena.

    glibc serves an allocation above its mmap threshold (128 KiB to 32 MiB) with a fresh ``mmap`` and unmaps it on
    free, and trims freed heap tops and thread arenas back to the OS; a training step allocates and frees hundreds of
    such tensors (activations of ``(tokens, 1536)`` = 8 MiB, LM-head probabilities ``(tokens, vocab)`` = 200 MiB), so
    every one is page-faulted in again, zero-filled by the kernel. Measured (SmolLM2-135M LoRA SFT, 2-core Xeon,
    benchmarks/README.md): ``torch.exp`` on a new (1024, 49152) tensor 58 ms vs 17 ms into a reused one; the whole
    step 1.4x faster (1.04-1.07x on a 2-core AMD EPYC) with the same loss bit for bit and the same peak RSS. The
    in-process form of the allocator settings PyTorch's CPU launcher makes (``torch.backends.xeon.run_cpu`` preloads
    jemalloc/tcmalloc).

    Kept as they are: GPU runs, non-glibc systems, a process whose allocator the user chose (``LD_PRELOAD`` naming
    jemalloc/tcmalloc/mimalloc, ``GLIBC_TUNABLES`` or ``MALLOC_*`` settings), and ``ALIGNKIT_CPU_ALLOCATOR=system``.
    Returns True when the settings were applied."""
    import ctypes
    import platform

    if env_choice("ALIGNKIT_CPU_ALLOCATOR", ("alignkit", "system"), "the CPU allocator") == "system" or gpu_available():
        return False
    preload = os.environ.get("LD_PRELOAD", "")
    if any(a in preload for a in ("jemalloc", "tcmalloc", "mimalloc")) or "malloc" in os.environ.get(
        "GLIBC_TUNABLES", ""
    ):
        return False
    if any(k.startswith("MALLOC_") for k in os.environ) or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = [mallopt(_M_MMAP_MAX, 0), mallopt(_M_TRIM_THRESHOLD, 2**31 - 1), mallopt(_M_ARENA_MAX, 1)]
    return all(done)
