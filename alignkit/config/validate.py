"""Cross-field checks, grouped by concern. Each failure says what to change."""

from __future__ import annotations

import os

from alignkit.errors import ConfigError


def check_model_source(recipe) -> None:
    m = recipe.model
    if not m.model_name_or_path:
        raise ConfigError("model_name_or_path: required. Fix: set it to a model directory, Hub id, .gguf file or 'tiny:llama'.")
    if m.from_scratch and recipe.adapter.use_peft:
        raise ConfigError("from_scratch with use_peft: a randomly initialised model needs full training. Fix: set use_peft: false.")
    if m.from_scratch and recipe.quant.load_in_4bit:
        raise ConfigError("from_scratch with load_in_4bit: random weights cannot be trained in 4-bit. Fix: set load_in_4bit: false.")


def check_quantization(recipe) -> None:
    q, a = recipe.quant, recipe.adapter
    if q.load_in_4bit and not a.use_peft:
        raise ConfigError(
            "load_in_4bit with use_peft: false: 4-bit weights cannot be trained directly. Fix: set use_peft: true (QLoRA) "
            "or load_in_4bit: false."
        )
    t = recipe.train
    if q.load_in_4bit and t is not None:
        fsdp = bool(getattr(t, "fsdp", None)) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
        if fsdp and q.bnb_4bit_quant_storage in (None, "uint8"):
            raise ConfigError(
                "load_in_4bit under FSDP with bnb_4bit_quant_storage uint8: FSDP cannot shard packed uint8 weights "
                "alongside float ones. Fix: set bnb_4bit_quant_storage to the compute dtype (e.g. bfloat16)."
            )


def check_training(recipe) -> None:
    t = recipe.train
    if t is None:
        return
    if getattr(t, "bf16", False) and getattr(t, "fp16", False):
        raise ConfigError("bf16 and fp16 are both true. Fix: pick one.")


CHECKS = (check_model_source, check_quantization, check_training)


def validate(recipe) -> None:
    for check in CHECKS:
        check(recipe)
