"""Facts about the device and the launch, in one place: bf16 support, the 'auto' dtype rule, world size, the
DeepSpeed ZeRO stage, parameter sharding (ZeRO-3 / FSDP), the CPU process-group backend, and the 4-bit storage dtype
that sharding needs. ``config/`` and ``models/`` decide with these; nothing here imports the rest of alignkit.

Sources: accelerate 1.15 passes the launch to the worker processes as environment variables (``WORLD_SIZE``,
``ACCELERATE_USE_DEEPSPEED``, ``ACCELERATE_DEEPSPEED_CONFIG_FILE``, ``ACCELERATE_DEEPSPEED_ZERO_STAGE``,
``ACCELERATE_USE_FSDP``); transformers' ``is_deepspeed_zero3_enabled`` tells a ZeRO-3 run set up through
``TrainingArguments.deepspeed``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")


def device_supports_bf16() -> bool:
    """True on a CUDA device with bf16 support. CPUs count as False: without bf16 units a bf16 GEMM is ~100x slower
    than fp32 (AVX2-only EPYC: 0.3 vs 50-140 GFLOP/s); with AMX it is faster but drifts (benchmarks/README.md)."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def auto_dtype_name(name: str) -> str:
    """The 'auto' rule for every dtype key (``dtype``, ``bnb_4bit_compute_dtype``): 'bfloat16' on GPUs that support
    it, 'float32' everywhere else; any other name is returned as it is."""
    if name == "auto":
        return "bfloat16" if device_supports_bf16() else "float32"
    return name


def resolve_dtype(name: str):
    """``torch.dtype`` for a dtype key's value ('auto', 'float32', 'bfloat16', 'float16')."""
    import torch

    return getattr(torch, auto_dtype_name(name))


def world_size() -> int:
    """Processes in this launch (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_distributed() -> bool:
    return world_size() > 1


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


def zero_stage(train_args=None) -> int | None:
    """The ZeRO stage of the TrainingArguments ``deepspeed`` config, else of the one ``accelerate launch`` passed on;
    None without DeepSpeed."""
    deepspeed = getattr(train_args, "deepspeed", None)
    if not deepspeed and not _env_true("ACCELERATE_USE_DEEPSPEED"):
        return None
    config = deepspeed or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if config != "none":
        config = config if isinstance(config, dict) else json.loads(Path(config).read_text())
        return int(config.get("zero_optimization", {}).get("stage", 0))
    return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 2))


def parameter_sharding(train_args=None) -> str | None:
    """'ZeRO-3' or 'FSDP' when this launch splits the parameters themselves across ranks, else None."""
    if getattr(train_args, "fsdp", None) or _env_true("ACCELERATE_USE_FSDP"):
        return "FSDP"
    if zero_stage(train_args) == 3:
        return "ZeRO-3"
    from transformers.integrations import is_deepspeed_zero3_enabled

    return "ZeRO-3" if is_deepspeed_zero3_enabled() else None


def uses_data_parallel(train_args=None) -> bool:
    """Several ranks with plain DDP (no DeepSpeed, no FSDP)."""
    return launched_distributed() and zero_stage(train_args) is None and parameter_sharding(train_args) is None


def quant_storage_name(storage: str | None, compute_dtype: str, train_args=None) -> str:
    """Storage dtype of the packed 4-bit weights: the recipe's ``bnb_4bit_quant_storage`` if set, else the compute
    dtype under ZeRO-3/FSDP (they flatten and split all parameters together, so the packed weights must share the
    others' dtype) and uint8 otherwise (bitsandbytes' default)."""
    if storage:
        return storage
    return auto_dtype_name(compute_dtype) if parameter_sharding(train_args) else "uint8"


def fit_backend_to_device(args) -> None:
    """Give a multi-process launch on a machine without GPUs a CPU backend, before transformers builds its state.

    accelerate 1.15 ``PartialState._prepare_backend`` picks a backend only for a device it finds (nccl for CUDA, ...)
    or, for CPUs, only when ``cpu=True``. A DeepSpeed launch never passes ``cpu=True`` (that would disable DeepSpeed),
    so on a GPU-less machine the backend stays None: DeepSpeed still joins its process group, but ``__init__`` then
    takes the "no backend == no distributed training" branch and every rank reports process_index 0 of 1, so no rank
    gets its own shard of the data. A DDP (MULTI_GPU) launch falls into the same branch. Here: DeepSpeed gets
    ``ddp_backend="gloo"`` (PartialState then reads rank and world size from the process group) and plain data
    parallel gets ``use_cpu=True`` (accelerate's MULTI_CPU path, gloo as well).
    """
    import torch

    if not launched_distributed() or torch.cuda.is_available() or args.use_cpu:
        return
    if _env_true("ACCELERATE_USE_DEEPSPEED") or args.deepspeed:
        args.ddp_backend = args.ddp_backend or "gloo"
    elif not _env_true("ACCELERATE_USE_FSDP"):
        args.use_cpu = True


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
    return threads


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

    if os.environ.get("ALIGNKIT_CPU_ALLOCATOR", "").lower() == "system" or gpu_available():
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


_LAUNCH_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


def clean_env() -> dict[str, str]:
    """This process's environment without the launcher's variables: for a helper process that must run as a plain
    single process (building a model inside a ZeRO-3 rank would construct and save it partitioned)."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ACCELERATE_", "DEEPSPEED", "TORCHELASTIC")) and k not in _LAUNCH_VARIABLES
    }


def gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def end_process_group_at_exit() -> None:
    """Destroy torch.distributed's process groups before the interpreter shuts down (an atexit handler, set once).

    Without it a rank can abort at exit after a finished run ('terminate called without an active exception', exit
    -6, seen about once in 10 two-rank ZeRO-3 launches): a Gloo worker thread still holds an async all-gather's
    tensors (ZeRO-3 prefetches), and releasing them during interpreter finalization takes the GIL from a dying thread
    (pytorch/pytorch#190489, #179291). At exit the ranks meet at a barrier, so no collective is still in flight, and
    the groups' backends are shut down while Python is fully alive."""
    import atexit

    if getattr(end_process_group_at_exit, "registered", False):
        return
    end_process_group_at_exit.registered = True
    atexit.register(_end_process_group)


def _end_process_group() -> None:
    import gc

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        dist.barrier()
    except Exception:  # noqa: BLE001 - another rank already gone: still shut down ours
        pass
    gc.collect()  # drop the Python side's last handles on finished work first
    dist.destroy_process_group()
