"""One loader for every task: causal LM and the classical heads, full precision or 4-bit, with adapters."""

from alignkit.models.loader import (
    TASK_HEADS,
    ModelSource,
    adapter_dtype_fix,
    apply_adapter,
    get_peft_config,
    get_quantization_config,
    load_base_model,
    load_config,
    load_model,
    resolve_dtype,
    resolve_source,
    trainable_parameter_names,
)
from alignkit.models.tokenizer import apply_contract, load_tokenizer

__all__ = [
    "TASK_HEADS",
    "ModelSource",
    "adapter_dtype_fix",
    "apply_adapter",
    "apply_contract",
    "get_peft_config",
    "get_quantization_config",
    "load_base_model",
    "load_config",
    "load_model",
    "load_tokenizer",
    "resolve_dtype",
    "resolve_source",
    "trainable_parameter_names",
]
