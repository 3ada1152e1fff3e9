"""Merge an adapter output into a standalone model, gated by a logit-parity check against base + adapter.

Adapters trained on a 4-bit base can be merged two ways:

- ``dequantize``: dequantize the nf4/fp4 base and merge into that. The merged model is the model that was trained
  and evaluated (the base as the adapter saw it), so parity holds to float rounding.
- ``full_precision``: merge into the original full-precision base. The adapter was fitted to the quantized weights, so
  the merged model differs from what was trained by the quantization error; the parity gate shows by how much.

peft's ``merge_and_unload`` on a 4-bit model re-quantizes the merged weights to 4-bit, silently losing the
adapter's small updates; neither method does that.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from alignkit.config.args import QuantizationArguments
from alignkit.data.templates import end_of_turn_ids
from alignkit.errors import ConfigError
from alignkit.export.outputs import staged_output
from alignkit.export.parity import (
    EXACT_BOUND,
    LOW_PRECISION_BOUND,
    PARITY_PROMPTS,
    MergeResult,
    Parity,
    check_merge_request,
    parity_batch,
    score,
    trained_args,
    trained_base,
    write_merge_record,
)
from alignkit.models import ModelSource, apply_contract, fit_embeddings, load_base_model
from alignkit.models.folders import check_adapter_folder
from alignkit.models.heads import get_head
from alignkit.models.trained import head_kwargs, quiet_head_report
from alignkit.runs import RunRecord


def merge_adapter(
    adapter_dir: str | Path,
    output_dir: str | Path | None = None,
    method: str | None = None,
    max_logit_diff: float | None = None,
    prompts: tuple[str, ...] = PARITY_PROMPTS,
) -> MergeResult:
    """Merge ``adapter_dir`` (an alignkit adapter output or a PEFT adapter folder) into its base and save a standalone
    safetensors model with tokenizer, chat template, generation config, alignkit_run.json and model card.

    ``output_dir`` defaults to ``<adapter_dir>-merged``. ``method``: ``dequantize`` (default for adapters trained on a
    4-bit base) or ``full_precision`` (the only choice for adapters trained on a full-precision base).
    ``max_logit_diff``: the parity bound (default: 1e-3 when both sides compute in float32, else 1e-1).
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    adapter_dir = Path(adapter_dir)
    if not adapter_dir.exists():
        raise ConfigError(
            f"{adapter_dir}: does not exist. Fix: pass a run's output_dir (a local folder with adapter_config.json and "
            "adapter_model.safetensors; merge reads no Hub id)."
        )
    if not (adapter_dir / "adapter_config.json").is_file():
        empty = " (the folder is empty)" if adapter_dir.is_dir() and not any(adapter_dir.iterdir()) else ""
        raise ConfigError(
            f"{adapter_dir}: lacks adapter_config.json{empty}, so it is not an adapter output. Fix: pass a run's "
            "output_dir (a folder with adapter_config.json and adapter_model.safetensors)."
        )
    if not any(adapter_dir.glob("adapter_model.*")):
        raise ConfigError(
            f"{adapter_dir}: the adapter folder is incomplete: it lacks adapter_model.safetensors. Fix: copy the run's "
            "output_dir again, or train the stage again."
        )
    check_adapter_folder(adapter_dir, fix=f"resume or rerun the run that wrote {adapter_dir}")
    record = RunRecord.for_model(adapter_dir)
    last = record.last if record else None
    task = (last.task if last else None) or "causal_lm"
    head = head_kwargs(last.head_config) if last else {}
    if task == "embedding":  # a SentenceTransformer folder, with an embedding-parity gate
        from alignkit.export.merge_embedding import merge_embedding

        return merge_embedding(adapter_dir, output_dir, method, max_logit_diff)
    if task in ("seq_cls", "token_cls") and not head:  # the heads whose shape the labels decide
        raise ConfigError(
            f"{adapter_dir}: a {task} adapter whose run record does not say how its head was built (written by an "
            "older alignkit). Fix: train it again with this alignkit, or load it with its head as the task tests do "
            "(alignkit.models.load_model(..., task, num_labels=...))."
        )
    model_args, quant_args = trained_args(adapter_dir, last)
    # Parity compares two fp32 computations: a 4-bit reference computing in bf16 (the 'auto' rule on a CPU or GPU
    # with bf16 units) would differ from the fp32 merge by bf16 rounding, not by anything the merge did.
    quant_args = dataclasses.replace(quant_args, bnb_4bit_compute_dtype="float32")
    method, output_dir = check_merge_request(adapter_dir, output_dir, method, quant_args.load_in_4bit)
    with staged_output(output_dir) as tmp:  # locked; built beside it, swapped in whole
        source = trained_base(model_args)
        has_tokenizer = (
            adapter_dir / "tokenizer_config.json"
        ).is_file()  # alignkit outputs do; bare PEFT folders may not
        tokenizer = AutoTokenizer.from_pretrained(
            adapter_dir if has_tokenizer else source.base, trust_remote_code=model_args.trust_remote_code
        )
        apply_contract(tokenizer)  # a pad token for batching the parity prompts
        batch = parity_batch(tokenizer, prompts)

        # The reference: the base exactly as the adapter was trained on it (4-bit if it was), plus the adapter.
        reference = PeftModel.from_pretrained(_base(model_args, quant_args, source, tokenizer, task, head), adapter_dir)
        reference.eval()
        ref_logits, ref_loss = score(reference, batch, task == "causal_lm")
        ref_dtype = reference.dtype
        del reference

        base = _base(
            model_args, quant_args if method == "dequantize" else QuantizationArguments(), source, tokenizer, task, head
        )
        if method == "dequantize":
            base = base.dequantize(dtype=base.dtype)
        merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
        if task == "causal_lm":
            merged.generation_config = _generation_config(merged, tokenizer)
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del merged, base

        # Parity is checked on what was saved, loaded the way users will load it.
        reloaded = get_head(task).auto().from_pretrained(tmp, dtype="auto").eval()
        merged_logits, merged_loss = score(reloaded, batch, task == "causal_lm")
        exact = reloaded.dtype == ref_dtype == torch.float32
        bound = max_logit_diff if max_logit_diff is not None else (EXACT_BOUND if exact else LOW_PRECISION_BOUND)
        diff = (merged_logits - ref_logits).abs()
        if diff.dim() == 3:  # per-token logits: the non-padding positions
            diff = diff[batch["attention_mask"].bool()]
        diff = diff.max().item()
        parity = Parity(max_abs_diff=diff, loss_adapter=ref_loss, loss_merged=merged_loss, bound=bound,
                        what="logit" if task == "causal_lm" else f"{task} head logit")  # fmt: skip
        print(f"merged {adapter_dir} -> {output_dir} (method {method})\n{parity.summary()}")

        write_merge_record(tmp, record, adapter_dir, output_dir, method, parity, model_args, task, head)
        from alignkit.export.card import write_model_card

        write_model_card(tmp)
    return MergeResult(output_dir=output_dir, method=method, parity=parity)


def _base(model_args, quant_args, source: ModelSource, tokenizer, task: str = "causal_lm", head: dict | None = None):
    with quiet_head_report():  # a task head here is new; the adapter's modules_to_save restore the trained one
        base = load_base_model(model_args, quant_args, task, source, **(head or {}))
    fit_embeddings(base, tokenizer)  # the run may have added a pad token
    if base.config.pad_token_id is None:
        base.config.pad_token_id = tokenizer.pad_token_id  # a classification head pools at the last non-pad token
    return base


def _generation_config(model, tokenizer):
    gen = model.generation_config
    eos = end_of_turn_ids(tokenizer)
    gen.eos_token_id = eos[0] if len(eos) == 1 else eos
    gen.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        gen.bos_token_id = tokenizer.bos_token_id
    return gen
