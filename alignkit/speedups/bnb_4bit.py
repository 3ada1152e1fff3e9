"""4-bit (bitsandbytes) training on CPUs: two fixes the trainer needs, applied as rows of :mod:`alignkit.speedups`
whatever ``speedups`` says (without them the numbers are wrong or the step ~100x slower, not just slower).

- ``keep_4bit_training_layout`` (model phase): bitsandbytes 0.50 ``Linear4bit.support_avx512bf16_for_cpu``.
- ``adapter_dtype`` (trainer phase): trl casts QLoRA adapter weights to bf16 (``peft`` ``prepare_model_for_kbit_training``
  in trl's trainer ``__init__``); on devices without fast bf16 they go back to the compute dtype.
"""

from __future__ import annotations

import torch

from alignkit import runtime


def keep_trainable_4bit_layout(model) -> bool:
    """On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights on the first eval-mode forward (an evaluation, a
    generate) into an inference layout with bf16 scales, whose kernel has no backward: every later training step gets
    wrong gradients through the 4-bit layers. Keep the layout training uses (tests/regression: 4-bit invariant)."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for module in layers:
        module.support_avx512bf16_for_cpu = False
    return bool(layers)


def adapter_dtype_fix(model, dtype: torch.dtype | None = None) -> bool:
    """trl casts QLoRA adapter weights to bf16; on devices without fast bf16 keep them in the compute dtype
    (``dtype``, default the 'auto' rule). Returns True when a parameter was cast."""
    dtype = dtype or runtime.resolve_dtype("auto")
    cast = [p for _, p in model.named_parameters() if p.requires_grad and p.dtype != dtype and p.is_floating_point()]
    for param in cast:
        param.data = param.data.to(dtype)
    return bool(cast)
