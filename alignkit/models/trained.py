"""Load what a run wrote, for inference: ``model, tokenizer = load_trained(output_dir)``.

An adapter output (LoRA adapter + a task head trained in full, PEFT ``modules_to_save``) is loaded on its base with
the head its run built (``head_config`` in alignkit_run.json: num_labels, id2label, ...), 4-bit if it was trained so,
then the adapter and the trained head on top; a full fine-tune or a merged model loads as it is.

peft's own ``AutoPeftModelFor<Task>.from_pretrained(output_dir)`` builds the base head from the base model's config
(two labels) and then fails with a size mismatch on the trained head: give it the head config,
``AutoPeftModelForTokenClassification.from_pretrained(output_dir, num_labels=7, id2label=..., label2id=...)``, or
use this loader, which reads them from the run record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path


class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


@contextlib.contextmanager
def quiet_head_report():
    """Silence transformers' load report while a base loads whose head an adapter restores next: its "newly
    initialized" warning is about the head that ``modules_to_save`` then replaces with the trained one.

    A filter on ``transformers.modeling_utils`` drops its records below ERROR; the logger's level is left alone,
    because transformers 5 reads ``logger.level >= WARNING`` as the switch for its tensor-parallel plan check
    (``verify_tp_plan``), which, on a model loaded without tensor parallelism, reports every norm as "not sharded"."""
    log, drop = logging.getLogger("transformers.modeling_utils"), _BelowError()
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


def head_kwargs(head_config: dict) -> dict:
    """A run record's ``head_config`` as from_pretrained takes it: JSON made ``id2label``'s ids text; ids are ints."""
    head = dict(head_config)
    if isinstance(head.get("id2label"), dict):
        head["id2label"] = {int(k): v for k, v in head["id2label"].items()}
    return head


def load_trained(path: str | Path, merge: bool = False, dtype: str = "float32"):
    """``(model, tokenizer)`` of a run's output dir or a model folder, in eval mode, with the head it was trained
    with (a causal LM for cpt/sft/dpo/..., the task head of a task run, a one-output sequence-classification head
    for a reward model). ``merge``: fold the adapter into the (dequantized, if 4-bit) base in memory and return the
    plain transformers model. Raises ConfigError / PreflightError for a folder that is not a model or run."""
    from peft import PeftModel

    from alignkit.config.args import ModelArguments, QuantizationArguments
    from alignkit.models.folders import check_trained_folder
    from alignkit.models.loader import fit_embeddings, load_base_model
    from alignkit.models.sources import resolve_source
    from alignkit.models.tokenizer import load_tokenizer

    check_trained_folder(path)  # a damaged file: one line naming it, before any library reads it
    model_args = ModelArguments(model_name_or_path=str(path), dtype=dtype)
    source = resolve_source(model_args)
    tokenizer = load_tokenizer(model_args, source=source)
    last = source.parent_run.last if source.parent_run else None
    task, head = (last.task or "causal_lm", head_kwargs(last.head_config)) if last else ("causal_lm", {})
    if source.adapter_dir is None:
        return _from(load_base_model(model_args, task=task, source=source, **head).eval(), path), tokenizer
    quant = last.group(QuantizationArguments) if last else QuantizationArguments()
    with quiet_head_report():
        base = load_base_model(model_args, quant, task, dataclasses.replace(source, adapter_dir=None), **head)
    if base.config.pad_token_id is None:
        base.config.pad_token_id = tokenizer.pad_token_id  # a classification head pools at the last non-pad token
    if not quant.load_in_4bit:  # the run added tokens (a pad, a family's end-of-turn): rows the adapter restores
        fit_embeddings(base, tokenizer)
    if not merge:
        return _from(PeftModel.from_pretrained(base, source.adapter_dir).eval(), path), tokenizer
    if quant.load_in_4bit:
        import torch

        base = base.dequantize(dtype=torch.float32)
    return _from(PeftModel.from_pretrained(base, source.adapter_dir).merge_and_unload().eval(), path), tokenizer


def _from(model, path):
    """``model`` marked with the run folder it was loaded from (``alignkit_trained_from``), where the task's
    ``predict`` reads the run's own settings (alignkit.tasks.qa.run_settings)."""
    model.alignkit_trained_from = str(path)
    return model
