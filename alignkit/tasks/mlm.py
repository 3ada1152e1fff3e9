"""Masked-LM domain adaptation: whole-word masking, perplexity on fixed eval masks before and after training."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from alignkit.data.schemas import Schema
from alignkit.errors import ConfigError
from alignkit.tasks.base import Task, require_text


class MaskingCollator:
    """Masks training batches afresh each time; eval rows arrive already masked (they carry ``labels``) and are only
    padded, so the untrained and the trained model are scored on the same masked tokens."""

    def __init__(self, masker, padder):
        self.masker, self.padder = masker, padder

    def __call__(self, features):
        if "labels" in features[0]:
            return self.padder(features)
        if "offset_mapping" in features[0]:  # tokenizer.pad cannot pad offsets; pad them like special tokens
            longest = max(len(f["input_ids"]) for f in features)
            left = self.masker.tokenizer.padding_side == "left"
            features = [{**f, "offset_mapping": _pad(f["offset_mapping"], longest, left)} for f in features]
        return self.masker(features)


def _pad(offsets: list, length: int, left: bool) -> list:
    padding = [[0, 0]] * (length - len(offsets))
    return padding + list(offsets) if left else list(offsets) + padding


def masked_token_nll(logits, labels):
    """Per-token negative log-likelihood (0 where unmasked), so eval keeps [batch, seq] numbers, not vocab logits."""
    import torch.nn.functional as F

    logits = logits[0] if isinstance(logits, tuple) else logits
    nll = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
    return nll.view(labels.shape)


@dataclass
class MaskedLMArguments:
    """mlm: masked-LM training on plain text."""

    text_column: str = field(default="text", metadata={"help": "seq_cls/mlm: the text column."})
    whole_word_masking: bool = field(default=True, metadata={"help": "mlm: mask all sub-tokens of a word together."})
    mlm_probability: float = field(default=0.15, metadata={"help": "mlm: fraction of words (tokens) masked."})

    def __post_init__(self):
        if not 0 < self.mlm_probability < 1:
            raise ConfigError(
                f"mlm_probability: must be between 0 and 1, got {self.mlm_probability}. Fix: use e.g. 0.15 (BERT's)."
            )


class MaskedLM(Task):
    name = "mlm"
    Arguments = MaskedLMArguments
    evaluate_before_training = True

    def __init__(self, args, tokenizer, train_args):
        super().__init__(args, tokenizer, train_args)
        if tokenizer.mask_token is None:
            raise ConfigError("mlm: the tokenizer has no mask token. Fix: use an encoder (BERT-style) model.")
        if args.whole_word_masking and not tokenizer.is_fast:
            raise ConfigError(
                "whole_word_masking: needs a fast tokenizer (offsets). Fix: set whole_word_masking: false."
            )
        if args.whole_word_masking and train_args.remove_unused_columns:
            raise ConfigError(
                "whole_word_masking: remove_unused_columns drops the token offsets the masking collator reads. "
                "Fix: set remove_unused_columns: false."
            )

    @property
    def schema(self) -> Schema:
        column = self.args.text_column
        return Schema(
            self.name,
            ((column,),),
            lambda row, source, i: require_text(row[column], source, i, column),
            f"give each row '{column}'",
        )

    def _masker(self, seed=None):
        from transformers import DataCollatorForLanguageModeling

        whole_words = self.args.whole_word_masking  # whole-word masking always uses [MASK] (no random replacement)
        return DataCollatorForLanguageModeling(
            self.tokenizer,
            mlm_probability=self.args.mlm_probability,
            whole_word_mask=whole_words,
            seed=seed,
            **({"mask_replace_prob": 1.0, "random_replace_prob": 0.0} if whole_words else {}),
        )

    def preprocess(self, datasets):
        def features(batch):
            return self.tokenizer(
                batch[self.args.text_column],
                truncation=True,
                max_length=self.max_length,
                return_special_tokens_mask=True,
                return_offsets_mapping=self.args.whole_word_masking,
            )

        tokenized = self._map(datasets, features)
        if "test" in tokenized:
            tokenized["test"] = tokenized["test"].map(
                self._mask_once(), batched=True, remove_columns=tokenized["test"].column_names
            )
        return tokenized

    def _mask_once(self):
        masker = MaskingCollator(self._masker(seed=self.train_args.seed), padder=None)

        def mask(batch):
            rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
            masked = masker(rows)
            real = masked["attention_mask"].bool()  # drop the padding again: the eval collator pads per batch
            return {
                key: [masked[key][k][real[k]].tolist() for k in range(len(rows))]
                for key in ("input_ids", "attention_mask", "labels")
            }

        return mask

    def collator(self, model):
        from transformers import DataCollatorForTokenClassification

        return MaskingCollator(self._masker(), DataCollatorForTokenClassification(self.tokenizer))

    preprocess_logits_for_metrics = staticmethod(masked_token_nll)

    def compute_metrics(self, eval_pred) -> dict[str, float]:
        masked = eval_pred.label_ids != -100
        return {"perplexity": math.exp(float(np.mean(eval_pred.predictions[masked])))}
