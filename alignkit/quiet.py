"""Quiet by default: the known third-party lines that say nothing about a run are dropped, in this one place.

Each line is matched by its logger (or warning category) and its text, so nothing else is hidden:

- bitsandbytes' ``Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'``: the
  optional ``kernels`` package (Hub-downloaded CPU kernels) is absent; bitsandbytes falls back to its own.
- DeepSpeed's ``Setting accelerator to CPU. If you have GPU ...``: printed on every machine without a GPU.
- transformers' ``The following layers were not sharded: model.norm.weight, ...`` and ``The following TP rules were
  not applied on any of the layers``: its tensor-parallel plan check (``verify_tp_plan``), which runs when the
  ``transformers.modeling_utils`` logger's own level is WARNING or above (set by code that silences that logger)
  and compares the model class's built-in TP plan with its weights. alignkit never loads with tensor parallelism,
  so nothing is sharded and the line describes no problem with the load.
- transformers' ``The modules are dequantized in torch.float32 and casted to torch.float32.``: printed by
  ``dequantize(dtype=...)`` (merging a 4-bit adapter run), restating the dtype alignkit asked for. The variant
  without a dtype (``... please specify `dtype` in `dequantize```) still shows.
- PyTorch's ``'pin_memory' argument is set as true but no accelerator is found``: transformers' default
  ``dataloader_pin_memory`` on a machine without a GPU; pinning does nothing there.
- transformers' ``is_gradient_checkpointing is deprecated`` FutureWarning: raised by peft and trl reading the old
  property, not by anything a recipe sets (recipes use ``activation_checkpointing``, the non-deprecated key).

``-v``/``--verbose`` on the command line (any entry point) or ``ALIGNKIT_VERBOSE=1`` shows every line again.
Installed when ``alignkit`` is imported, before trl, bitsandbytes or DeepSpeed print anything.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

# (logger name, message pattern): lines that go through the logging module.
LOG_LINES = (
    ("bitsandbytes.backends.cpu.ops", r"Failed to load CPU gemm_4bit_forward from kernels-community"),
    ("DeepSpeed", r"Setting accelerator to CPU\. If you have GPU"),
    (
        "transformers.distributed.tensor_parallel",
        r"^The following (layers were not sharded|TP rules were not applied on any of the layers): ",
    ),
    ("transformers.integrations.bitsandbytes", r"^The modules are dequantized in \S+ and casted to \S+\.$"),
)
# (category, message pattern): lines that go through warnings.warn.
WARNINGS = (
    (UserWarning, r"'pin_memory' argument is set as true but no accelerator is found"),
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
)
VERBOSE_FLAGS = ("-v", "--verbose")


def verbose() -> bool:
    """True when every line should show: ``ALIGNKIT_VERBOSE`` set (not 0), or ``-v``/``--verbose`` in ``sys.argv``."""
    return os.environ.get("ALIGNKIT_VERBOSE", "0") not in ("", "0") or any(a in VERBOSE_FLAGS for a in sys.argv[1:])


class _DropLine(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def install() -> None:
    """Drop the known lines (:data:`LOG_LINES`, :data:`WARNINGS`), unless :func:`verbose`. Idempotent."""
    if verbose():
        return
    for name, pattern in LOG_LINES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLine) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(_DropLine(pattern))
    for category, pattern in WARNINGS:
        warnings.filterwarnings("ignore", message=f".*{pattern}", category=category)
