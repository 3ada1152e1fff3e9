"""Padding-free SFT batches: trl's collator concatenates each batch's rows into one sequence (``padding_free``)
instead of padding them, without trl's own requirement of packing or ``max_length: null``.

Touches trl 1.16 ``trl.trainer.sft_trainer.DataCollatorForLanguageModeling.padding_free``, set after ``SFTTrainer``
validated its arguments (trl would refuse the combination up front).
"""

from __future__ import annotations


def concatenate_rows(trainer) -> bool:
    """Switch trl's SFT collator from padding each batch to concatenating its rows into one sequence whose position ids
    restart at every row (trl's padding-free mode, without trl's requirement of packing or max_length: null, so
    max_length still truncates). transformers derives a block-diagonal causal mask from those position ids (sdpa, eager
    and flash attention alike), so every row's loss and gradients are the padded ones: tests/regression checks it."""
    collator = trainer.data_collator
    if getattr(collator, "padding_free", True):  # not trl's language-modeling collator, or already padding-free
        return False
    collator.padding_free = True
    return True
