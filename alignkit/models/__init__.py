"""Models: where they come from (sources, packaged), what their heads are (heads), how they load (loader: full
precision or 4-bit, with adapters and stage hand-offs) and the tokenizer contract (tokenizer)."""

from alignkit.models.heads import HEADS, Head, get_head
from alignkit.models.loader import (
    apply_adapter,
    fit_embeddings,
    get_peft_config,
    get_quantization_config,
    load_base_model,
    load_config,
    load_model,
    trainable_parameter_names,
)
from alignkit.models.sources import ModelSource, resolve_source
from alignkit.models.tokenizer import apply_contract, load_tokenizer
from alignkit.models.trained import load_trained

__all__ = [
    "HEADS",
    "Head",
    "ModelSource",
    "apply_adapter",
    "apply_contract",
    "fit_embeddings",
    "get_head",
    "get_peft_config",
    "get_quantization_config",
    "load_base_model",
    "load_config",
    "load_model",
    "load_tokenizer",
    "load_trained",
    "resolve_source",
    "trainable_parameter_names",
]
