"""Facts about the device and the launch, in one place: bf16 support, the 'auto' dtype rule, world size, the
DeepSpeed ZeRO stage, parameter sharding (ZeRO-3 / FSDP), and the 4-bit storage dtype that sharding needs. ``config/`` and ``models/`` decide with these; nothing here imports the rest of alignkit, and
nothing here changes the process (what does, threads and the allocator, is a row of :mod:`alignkit.speedups`).

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
