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
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from alignkit.config.args import ModelArguments, QuantizationArguments
from alignkit.data.templates import end_of_turn_ids
from alignkit.errors import ConfigError
from alignkit.models import ModelSource, apply_contract, fit_embeddings, load_base_model, resolve_source
from alignkit.models.heads import get_head
from alignkit.models.trained import head_kwargs, quiet_head_report
from alignkit.runs import BaseModelRef, LineageEntry, MergeInfo, RunRecord

MERGE_METHODS = ("dequantize", "full_precision")
# Default parity bounds (max |logit difference|). When both sides compute in float32 they agree to rounding (~1e-6;
# a 4-bit reference dequantizes each weight to its fp32 compute dtype). bf16/fp16 round every merged weight and
# activation, which moves logits by ~1e-2.
EXACT_BOUND, LOW_PRECISION_BOUND = 1e-3, 1e-1
PARITY_PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "What is 12 + 30? ANSWER: 42",
    "Alice lives in Paris and works for a company in London.",
)
PARITY_CHAT = [{"role": "user", "content": "What is 23 + 19?"}, {"role": "assistant", "content": "ANSWER: 42"}]


@dataclass
class Parity:
    """Merged model vs base + adapter on fixed prompts."""

    max_abs_diff: float  # over every vocabulary logit at every non-padding position
    loss_adapter: float  # causal-LM loss of base + adapter on the prompts
    loss_merged: float
    bound: float

    @property
    def loss_delta(self) -> float:
        return self.loss_merged - self.loss_adapter

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.bound

    def summary(self) -> str:
        verdict = "ok" if self.passed else f"ABOVE the bound {self.bound:g}"
        return (
            f"parity: max |logit diff| = {self.max_abs_diff:.3g} ({verdict}); loss on the parity prompts: "
            f"base+adapter {self.loss_adapter:.5f}, merged {self.loss_merged:.5f}, delta {self.loss_delta:+.3g}"
        )


@dataclass
class MergeResult:
    output_dir: Path
    method: str
    parity: Parity


def check_merge_request(adapter_dir: Path, output_dir, method: str | None, quantized: bool) -> tuple[str, Path]:
    """The merge method (default: dequantize for a 4-bit base, else full_precision) and the output folder (default:
    ``<adapter_dir>-merged``), checked before any model loads. Raises ConfigError for an unknown method, dequantize
    of a full-precision base, or an output folder that holds something other than an earlier merge."""
    method = method or ("dequantize" if quantized else "full_precision")
    if method not in MERGE_METHODS:
        raise ConfigError(f"method: '{method}' is not one of {MERGE_METHODS}.")
    if method == "dequantize" and not quantized:
        raise ConfigError(
            f"method dequantize: {adapter_dir} was trained on a full-precision base. Fix: use full_precision."
        )
    output_dir = Path(output_dir) if output_dir else adapter_dir.with_name(adapter_dir.name + "-merged")
    previous = RunRecord.read(output_dir) if output_dir.exists() else None
    if output_dir.exists() and any(output_dir.iterdir()) and not (previous and previous.merge):
        raise ConfigError(f"{output_dir}: exists and is not an earlier merge. Fix: choose another output folder.")
    return method, output_dir


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
    record = RunRecord.read(adapter_dir)
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
    model_args, quant_args = _trained_args(adapter_dir, last)
    method, output_dir = check_merge_request(adapter_dir, output_dir, method, quant_args.load_in_4bit)
    source = _trained_base(model_args)
    has_tokenizer = (adapter_dir / "tokenizer_config.json").is_file()  # alignkit outputs do; bare PEFT folders may not
    tokenizer = AutoTokenizer.from_pretrained(
        adapter_dir if has_tokenizer else source.base, trust_remote_code=model_args.trust_remote_code
    )
    apply_contract(tokenizer)  # a pad token for batching the parity prompts
    batch = _parity_batch(tokenizer, prompts)

    # The reference: the base exactly as the adapter was trained on it (4-bit if it was), plus the adapter.
    reference = PeftModel.from_pretrained(_base(model_args, quant_args, source, tokenizer, task, head), adapter_dir)
    reference.eval()
    ref_logits, ref_loss = _score(reference, batch, task == "causal_lm")
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
    tmp = output_dir.with_name(output_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    del merged, base

    # Parity is checked on what was saved, loaded the way users will load it.
    reloaded = get_head(task).auto().from_pretrained(tmp, dtype="auto").eval()
    merged_logits, merged_loss = _score(reloaded, batch, task == "causal_lm")
    exact = reloaded.dtype == ref_dtype == torch.float32
    bound = max_logit_diff if max_logit_diff is not None else (EXACT_BOUND if exact else LOW_PRECISION_BOUND)
    diff = (merged_logits - ref_logits).abs()
    if diff.dim() == 3:  # per-token logits: the non-padding positions
        diff = diff[batch["attention_mask"].bool()]
    diff = diff.max().item()
    parity = Parity(max_abs_diff=diff, loss_adapter=ref_loss, loss_merged=merged_loss, bound=bound)
    print(f"merged {adapter_dir} -> {output_dir} (method {method})\n{parity.summary()}")

    _write_record(tmp, record, adapter_dir, output_dir, method, parity, model_args, task, head)
    shutil.rmtree(output_dir, ignore_errors=True)
    tmp.rename(output_dir)
    from alignkit.export.card import write_model_card

    write_model_card(output_dir)
    return MergeResult(output_dir=output_dir, method=method, parity=parity)


def _trained_args(adapter_dir: Path, last: LineageEntry | None) -> tuple[ModelArguments, QuantizationArguments]:
    """The model/quantization args the adapter's run used, pointed at the adapter (which resolves to its base)."""
    if last is None:  # a bare PEFT folder: its base as adapter_config.json names it, full precision
        return ModelArguments(model_name_or_path=str(adapter_dir)), QuantizationArguments()
    return last.group(ModelArguments, model_name_or_path=str(adapter_dir)), last.group(QuantizationArguments)


def _trained_base(model_args: ModelArguments) -> ModelSource:
    """The base the adapter was trained on, as the loader resolves it: the run's base, or after a 'merge' hand-off
    the merged base, with earlier stages' adapters to fold in after a 'reference' hand-off."""
    return dataclasses.replace(resolve_source(model_args), adapter_dir=None)


def _base(model_args, quant_args, source: ModelSource, tokenizer, task: str = "causal_lm", head: dict | None = None):
    with quiet_head_report():  # a task head here is new; the adapter's modules_to_save restore the trained one
        base = load_base_model(model_args, quant_args, task, source, **(head or {}))
    fit_embeddings(base, tokenizer)  # the run may have added a pad token
    if base.config.pad_token_id is None:
        base.config.pad_token_id = tokenizer.pad_token_id  # a classification head pools at the last non-pad token
    return base


def _parity_batch(tokenizer, prompts) -> dict[str, torch.Tensor]:
    texts = list(prompts)
    if tokenizer.chat_template:
        texts.append(tokenizer.apply_chat_template(PARITY_CHAT, tokenize=False))
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


@torch.no_grad()
def _score(model, batch, causal: bool = True) -> tuple[torch.Tensor, float]:
    """Logits on the parity prompts and, for a causal LM, its loss on them (other heads: 0.0)."""
    batch = batch.to(model.device)
    if not causal:  # a task head: its logits (QA: start and end logits, stacked on a last axis)
        # an encoder-decoder (seq2seq) scores the prompts as targets too: T5 has no decoder inputs without them
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        out = model(**batch, labels=labels) if getattr(model.config, "is_encoder_decoder", False) else model(**batch)
        logits = out.logits if "logits" in out else torch.stack([out.start_logits, out.end_logits], -1)
        return logits.float().cpu(), 0.0
    out = model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100))
    return out.logits.float().cpu(), out.loss.item()


def _generation_config(model, tokenizer):
    gen = model.generation_config
    eos = end_of_turn_ids(tokenizer)
    gen.eos_token_id = eos[0] if len(eos) == 1 else eos
    gen.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        gen.bos_token_id = tokenizer.bos_token_id
    return gen


def _write_record(
    folder: Path, record: RunRecord | None, adapter_dir: Path, output_dir: Path, method: str, parity: Parity, model_args,
    task: str = "causal_lm", head: dict | None = None,
) -> None:  # fmt: skip
    merge = MergeInfo(
        method=method,
        max_abs_logit_diff=parity.max_abs_diff,
        max_logit_diff_bound=parity.bound,
        parity_passed=parity.passed,
        loss_base_plus_adapter=parity.loss_adapter,
        loss_merged=parity.loss_merged,
        loss_delta=parity.loss_delta,
    )
    record = record or RunRecord(stage="merge", base_model_args=BaseModelRef(resolve_source(model_args).base))
    entry = LineageEntry(
        stage="merge", output_dir=str(output_dir), from_adapter=str(adapter_dir), merge=merge,
        task=None if task == "causal_lm" else task, head_config=head or {},
    )  # fmt: skip
    dataclasses.replace(record, status="finished", lineage=[*record.lineage, entry], merge=merge).write(folder)
