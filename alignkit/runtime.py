"""Facts about the device and the launch, in one place: bf16 support, the 'auto' dtype rule, world size, the
DeepSpeed ZeRO stage, parameter sharding (ZeRO-3 / FSDP), and the 4-bit storage dtype that sharding needs. ``config/`` and ``models/`` decide with these; nothing here imports the rest of alignkit, and
nothing here changes the process (what does, threads and the allocator, is a row of :mod:`alignkit.speedups`).

Sources: accelerate 1.15 passes the launch to the worker processes as environment variables (``WORLD_SIZE``,
``ACCELERATE_USE_DEEPSPEED``, ``ACCELERATE_DEEPSPEED_CONFIG_FILE``, ``ACCELERATE_DEEPSPEED_ZERO_STAGE``,
``ACCELERATE_USE_FSDP``); transformers' ``is_deepspeed_zero3_enabled`` tells a ZeRO-3 run set up through
``TrainingArguments.deepspeed``.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")


def device_supports_bf16() -> bool:
    """True on a CUDA device with bf16 support: there 'auto' means bf16 weights and bf16 mixed precision. CPUs count
    as False here (their bf16 weights drift; see :func:`cpu_mixed_precision` for bf16 matmuls on fp32 weights)."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


# ------------------------------------------------------------------ CPU bf16 mixed precision
CPU_AMP_ENV = "ALIGNKIT_CPU_AMP"  # auto (probe) | off | on: the test suite sets off, so no test depends on the CPU kind
BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of bf16 units (AMX tiles; AVX512-BF16 dot products)
ISA_ENV = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")
PROBE_MIN_SPEEDUP = 1.3  # bf16 GEMMs must beat fp32 by this much (Zen 4 measures 2.2x, AMX 6x, AVX2-only 0.005x)
PROBE_SIZES = (256, 512)  # the gate (an AVX2-only bf16 GEMM of 256^3 takes ~60 ms: timed once), then the figures


def cpu_facts() -> dict:
    """The CPU: ``model`` (its name), ``bf16_units`` (the flags of :data:`BF16_FLAGS` it has), ``isa`` (ATen's CPU
    capability, e.g. 'AVX512' or 'AVX2') and ``isa_env`` (the ISA caps set in the environment). Linux /proc/cpuinfo;
    elsewhere model 'unknown' and no units."""
    import torch

    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    return {
        "model": model,
        "bf16_units": [f for f in BF16_FLAGS if f in flags],
        "isa": torch.backends.cpu.get_cpu_capability(),
        "isa_env": {k: os.environ[k] for k in ISA_ENV if k in os.environ},
        "threads": torch.get_num_threads(),
    }


def _gemm_seconds(dtype, n: int, reps: int, give_up: float = float("inf")) -> float:
    """Best of ``reps`` (n, n) @ (n, n) products in ``dtype``, seconds, after one warm-up; the warm-up's time alone
    when it took longer than ``give_up`` seconds (a bf16 GEMM without bf16 units: not worth timing further)."""
    import time

    import torch

    rng = torch.Generator().manual_seed(0)  # its own: a probe must not move the run's seeded random stream
    a, b = torch.randn(n, n, generator=rng).to(dtype), torch.randn(n, n, generator=rng).to(dtype)
    start = time.perf_counter()
    torch.mm(a, b)
    best = time.perf_counter() - start
    if best > give_up:
        return best
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def gemm_probe() -> dict:
    """A short GEMM probe, once per process (~10-40 ms): bf16 vs fp32 (n, n) products at ``PROBE_SIZES``, best of 5
    each. Returns ``{"n", "float32_gflops", "bfloat16_gflops", "speedup"}`` (GFLOP/s at the last size measured; the
    probe stops at the first size where bf16 does not beat fp32 by :data:`PROBE_MIN_SPEEDUP`, and a bf16 GEMM slower
    than 10 ms at the first size, ~3 GFLOP/s, is not repeated)."""
    import torch

    result: dict = {}
    for n in PROBE_SIZES:
        bf16 = _gemm_seconds(torch.bfloat16, n, 5, give_up=0.01)
        fp32 = _gemm_seconds(torch.float32, n, 5)
        flops = 2 * n**3 / 1e9
        result = {"n": n, "float32_gflops": round(flops / fp32, 1), "bfloat16_gflops": round(flops / bf16, 1),
                  "speedup": round(fp32 / bf16, 2)}  # fmt: skip
        if result["speedup"] < PROBE_MIN_SPEEDUP:
            break
    return result


def choose_cpu_amp(setting: str, bf16_units: list[str], probe: dict | None) -> tuple[bool, str]:
    """The CPU mixed-precision rule, from facts alone: ``setting`` (the :data:`CPU_AMP_ENV` value: auto, off, on),
    the CPU's bf16 unit flags and the :func:`gemm_probe` result (None when not run). Returns (bf16 autocast?, why)."""
    if setting == "off":
        return False, f"{CPU_AMP_ENV}=off"
    if setting == "on":
        return True, f"{CPU_AMP_ENV}=on"
    if not bf16_units:
        return False, "no bf16 units (AVX2-only or unknown CPU)"
    if probe is None or probe.get("speedup", 0) < PROBE_MIN_SPEEDUP:
        return False, f"bf16 units but the bf16 GEMM is not {PROBE_MIN_SPEEDUP}x faster than fp32 (probe {probe})"
    return True, f"{'/'.join(bf16_units)} and the bf16 GEMM is {probe['speedup']}x fp32"


def env_choice(name: str, choices: tuple[str, ...], what: str) -> str:
    """The value of environment variable ``name`` (stripped, lower case), one of ``choices``; the first choice when
    it is unset or empty. ``what``: what the variable sets, for the error. Raises ConfigError (with did-you-mean)
    for any other value: a typo must not silently mean the default."""
    from alignkit.errors import ConfigError, suggest

    value = os.environ.get(name, "").strip().lower() or choices[0]
    if value not in choices:
        raise ConfigError(
            f"{name}={os.environ[name]!r} ({what}) is not one of {', '.join(choices)}.{suggest(value, choices)} "
            f"Fix: set it to one of them, or unset it (default: {choices[0]})."
        )
    return value


@functools.cache
def cpu_mixed_precision() -> dict:
    """Whether 'auto' means bf16 mixed precision on this CPU (fp32 weights, optimizer state and adapters; bf16
    matmuls under ``torch.autocast('cpu')``): ``{"bf16": bool, "why": str, "cpu": cpu_facts(), "probe": dict|None}``.
    Once per process; the probe runs only where the CPU has bf16 units and :data:`CPU_AMP_ENV` is auto (default).
    Raises ConfigError for another :data:`CPU_AMP_ENV` value."""
    setting = env_choice(CPU_AMP_ENV, ("auto", "off", "on"), "bf16 mixed precision on CPUs with bf16 units")
    facts = cpu_facts()
    probe = gemm_probe() if setting == "auto" and facts["bf16_units"] else None
    bf16, why = choose_cpu_amp(setting, facts["bf16_units"], probe)
    return {"bf16": bf16, "why": why, "cpu": facts, "probe": probe}


def auto_dtype_name(name: str) -> str:
    """The 'auto' rule for the weights (``dtype``; for a 4-bit model the weights it keeps unquantized): 'bfloat16' on
    GPUs that support it, 'float32' everywhere else (CPUs keep fp32 master weights, also under bf16 mixed precision);
    any other name is returned as it is."""
    if name == "auto":
        return "bfloat16" if device_supports_bf16() else "float32"
    return name


def compute_dtype_name(name: str) -> str:
    """The 'auto' rule for ``bnb_4bit_compute_dtype`` (the dtype 4-bit layers dequantize to and multiply in):
    'bfloat16' on GPUs that support it and on CPUs where :func:`cpu_mixed_precision` chose bf16, else 'float32'."""
    if name == "auto" and not device_supports_bf16() and not gpu_available():
        return "bfloat16" if cpu_mixed_precision()["bf16"] else "float32"
    return auto_dtype_name(name)


def uses_cpu_amp(dtype_name: str) -> bool:
    """bf16 autocast for a run whose dtype key (``dtype``, or ``bnb_4bit_compute_dtype`` for a 4-bit model) is
    ``dtype_name``: only 'auto', only without a GPU, only where :func:`cpu_mixed_precision` chose bf16."""
    return dtype_name == "auto" and not gpu_available() and cpu_mixed_precision()["bf16"]


def precision_summary(dtype_name: str, mixed: str, load_in_4bit: bool = False) -> dict:
    """What a run trains in, for its log line and ``alignkit_run.json``: ``weights`` (the dtype the unquantized weights
    load in), ``mixed_precision`` ('bf16', 'fp16' or 'no', the trainer's), ``bnb_4bit_compute`` (4-bit only), and on
    a CPU ``why``, ``cpu`` and ``probe`` from :func:`cpu_mixed_precision`. ``dtype_name``: the run's dtype key
    (``bnb_4bit_compute_dtype`` for a 4-bit model, else ``dtype``)."""
    out: dict = {"weights": auto_dtype_name(dtype_name), "mixed_precision": mixed}
    if load_in_4bit:
        out["bnb_4bit_compute"] = compute_dtype_name(dtype_name)
    if not gpu_available():
        amp = cpu_mixed_precision()
        out["why"] = amp["why"] if dtype_name == "auto" else f"dtype set to {dtype_name}"
        out.update(cpu=amp["cpu"], probe=amp["probe"])
    return out


def resolve_dtype(name: str):
    """``torch.dtype`` of the weights for a dtype key's value ('auto', 'float32', 'bfloat16', 'float16')."""
    import torch

    return getattr(torch, auto_dtype_name(name))


def world_size() -> int:
    """Processes in this launch (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_distributed() -> bool:
    return world_size() > 1


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def env_flag(name: str) -> bool:
    """A launcher's boolean environment variable (accelerate writes 'true'/'false')."""
    return os.environ.get(name, "false").lower() == "true"


def zero_stage(train_args=None) -> int | None:
    """The ZeRO stage of the TrainingArguments ``deepspeed`` config, else of the one ``accelerate launch`` passed on;
    None without DeepSpeed."""
    deepspeed = getattr(train_args, "deepspeed", None)
    if not deepspeed and not env_flag("ACCELERATE_USE_DEEPSPEED"):
        return None
    config = deepspeed or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if config != "none":
        config = config if isinstance(config, dict) else json.loads(Path(config).read_text())
        return int(config.get("zero_optimization", {}).get("stage", 0))
    return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 2))


def parameter_sharding(train_args=None) -> str | None:
    """'ZeRO-3' or 'FSDP' when this launch splits the parameters themselves across ranks, else None."""
    if getattr(train_args, "fsdp", None) or env_flag("ACCELERATE_USE_FSDP"):
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


def memory_facts() -> dict:
    """This machine's memory in bytes: ``total`` (RAM, or the container's cgroup limit when lower) and ``available``
    (the kernel's MemAvailable, capped by what the cgroup has left); None where Linux does not say."""
    info: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            parts = value.split()
            if parts and parts[0].isdigit():
                info[key] = int(parts[0]) * 1024
    except OSError:
        pass
    total, available = info.get("MemTotal"), info.get("MemAvailable")
    limit, used = _cgroup_memory()
    if limit is not None and (total is None or limit < total):
        total = limit
        if used is not None:
            available = min(available or limit, max(0, limit - used))
    return {"total": total, "available": available}


def _cgroup_memory() -> tuple[int | None, int | None]:
    """(limit, usage) of this process's cgroup v2 (or v1) memory controller; (None, None) when unlimited or absent."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):  # fmt: skip
        try:
            raw = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if not raw.isdigit() or int(raw) >= 1 << 60:
            return None, None
        try:
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            usage = None
        return int(raw), usage
    return None, None
