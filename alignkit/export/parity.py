"""What every merge shares (alignkit.export.merge for causal-LM and task heads, alignkit.export.merge_embedding for
sentence embeddings) and GGUF export reuses: the parity prompts, how a model is scored on them, the bounds, the
:class:`Parity` verdict, the trained base an adapter resolves to, the merge request check and the merge's run record.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from alignkit.config.args import ModelArguments, QuantizationArguments
from alignkit.errors import ConfigError, MergeParityError
from alignkit.models import ModelSource, resolve_source
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
    """Merged model vs base + adapter on fixed prompts. ``loss_adapter``/``loss_merged``: a causal LM's loss on the
    prompts; None for a task head (no labels on the prompts: its logits are what is compared)."""

    max_abs_diff: (
        float  # over every logit of the head (a vocabulary, the tags, QA's start/end) at non-padding positions
    )
    loss_adapter: float | None  # causal-LM loss of base + adapter on the prompts (None: a task head)
    loss_merged: float | None
    bound: float
    what: str = "logit"  # what max_abs_diff compares, for the summary line

    @property
    def loss_delta(self) -> float | None:
        if self.loss_adapter is None or self.loss_merged is None:
            return None
        return self.loss_merged - self.loss_adapter

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.bound

    def summary(self) -> str:
        verdict = "ok" if self.passed else f"ABOVE the bound {self.bound:g}"
        line = f"parity: max |{self.what} diff| = {self.max_abs_diff:.3g} ({verdict})"
        if self.loss_delta is None:
            return line + " (a task head has no loss on the unlabelled parity prompts: its logits are compared)"
        return (
            f"{line}; loss on the parity prompts: "
            f"base+adapter {self.loss_adapter:.5f}, merged {self.loss_merged:.5f}, delta {self.loss_delta:+.3g}"
        )


@dataclass
class MergeResult:
    output_dir: Path
    method: str
    parity: Parity


def require_parity(result: MergeResult, force: bool = False, consequence: str = "") -> MergeResult:
    """The parity gate's verdict as an exit: returns ``result`` when the merged model's max |logit diff| is within the
    bound (or ``force``), else raises :class:`MergeParityError` (exit 1) naming the figures and the fixes; the merged
    folder stays on disk either way (its alignkit_run.json and card say whether it passed). ``consequence``: what is
    not done because of it (e.g. "not pushed to the Hub"), for the message."""
    parity = result.parity
    if parity.passed or force:
        return result
    then = f"; {consequence}" if consequence else ""
    raise MergeParityError(
        f"{result.output_dir}: the merged model failed the parity gate: its logits differ from base + adapter by "
        f"{parity.max_abs_diff:.3g}, above the bound {parity.bound:g} (loss on the parity prompts "
        f"{parity.loss_adapter:.5f} -> {parity.loss_merged:.5f}), so it is not the model that was trained{then}. The "
        "folder is kept for inspection (its alignkit_run.json and model card record the figures). Fix: merge an adapter "
        "trained on a 4-bit base with --method dequantize (the default); if the difference is expected, raise "
        "--max_logit_diff or pass --force to accept it."
    )


def is_merge(folder: Path) -> bool:
    """True when ``folder`` holds an earlier alignkit merge (which a new merge may replace)."""
    try:
        record = RunRecord.read(folder)
    except ConfigError:
        return False
    return bool(record and record.merge)


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
    from alignkit.export.outputs import check_output

    check_output(output_dir, "folder", inputs=[adapter_dir], ours=is_merge, earlier="an earlier merge")
    return method, output_dir


def trained_args(adapter_dir: Path, last: LineageEntry | None) -> tuple[ModelArguments, QuantizationArguments]:
    """The model/quantization args the adapter's run used, pointed at the adapter (which resolves to its base)."""
    if last is None:  # a bare PEFT folder: its base as adapter_config.json names it, full precision
        return ModelArguments(model_name_or_path=str(adapter_dir)), QuantizationArguments()
    return last.group(ModelArguments, model_name_or_path=str(adapter_dir)), last.group(QuantizationArguments)


def trained_base(model_args: ModelArguments) -> ModelSource:
    """The base the adapter was trained on, as the loader resolves it: the run's base, or after a 'merge' hand-off
    the merged base, with earlier stages' adapters to fold in after a 'reference' hand-off."""
    return dataclasses.replace(resolve_source(model_args), adapter_dir=None)


def parity_batch(tokenizer, prompts) -> dict[str, torch.Tensor]:
    texts = list(prompts)
    if tokenizer.chat_template:
        texts.append(tokenizer.apply_chat_template(PARITY_CHAT, tokenize=False))
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


@torch.no_grad()
def score(model, batch, causal: bool = True) -> tuple[torch.Tensor, float | None]:
    """Logits on the parity prompts and, for a causal LM, its loss on them (other heads: None, no labels)."""
    batch = batch.to(model.device)
    if not causal:  # a task head: its logits (QA: start and end logits, stacked on a last axis)
        # an encoder-decoder (seq2seq) scores the prompts as targets too: T5 has no decoder inputs without them
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        out = model(**batch, labels=labels) if getattr(model.config, "is_encoder_decoder", False) else model(**batch)
        logits = out.logits if "logits" in out else torch.stack([out.start_logits, out.end_logits], -1)
        return logits.float().cpu(), None
    out = model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100))
    return out.logits.float().cpu(), out.loss.item()


def write_merge_record(
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
