"""The ``embed`` stage's configs: sentence-transformers' training arguments with alignkit's defaults, and the
embedding keys. Importing sentence-transformers takes a while, so ``alignkit.config`` loads this module only when
the embed stage asks for these classes."""

from __future__ import annotations

from dataclasses import dataclass, field

from sentence_transformers import SentenceTransformerTrainingArguments

from alignkit.config.trainers import _StageDefaults
from alignkit.errors import ConfigError

LOSS_NAMES = ("auto", "mnrl", "cached_mnrl", "cosent", "cosine")


@dataclass
class EmbedConfig(_StageDefaults, SentenceTransformerTrainingArguments):
    """sentence-transformers' SentenceTransformerTrainingArguments (a transformers TrainingArguments) for the
    SentenceTransformerTrainer. ``batch_sampler`` defaults to ``no_duplicates``: with in-batch negatives, a text twice
    in one batch would be its own negative."""

    batch_sampler: str = field(
        default="no_duplicates",
        metadata={"help": "sentence-transformers' batch sampler: no_duplicates, batch_sampler, group_by_label."},
    )


@dataclass
class EmbeddingArguments:
    """The embed recipe's keys (alignkit.tasks.embedding)."""

    loss: str = field(
        default="auto",
        metadata={
            "help": "auto (mnrl for pairs/triplets, cosent for scored pairs), mnrl (MultipleNegativesRankingLoss), "
            "cached_mnrl (its GradCache version: big batches in mini_batch_size memory), cosent (CoSENTLoss), "
            "cosine (CosineSimilarityLoss).",
            "choices": list(LOSS_NAMES),
        },
    )
    mini_batch_size: int = field(
        default=32, metadata={"help": "cached_mnrl: texts per forward/backward chunk (memory, not the result)."}
    )
    max_seq_length: int | None = field(
        default=None,
        metadata={"help": "Tokens per text; null: the model's sentence_bert_config.json, else the tokenizer's limit."},
    )
    merge_after_training: bool = field(
        default=True,
        metadata={
            "help": "LoRA runs: also write <output_dir>-merged, the plain SentenceTransformer folder (what `alignkit "
            "merge` writes; full fine-tuning writes it to output_dir)."
        },
    )

    def __post_init__(self):
        if self.loss not in LOSS_NAMES:
            raise ConfigError(f"loss: '{self.loss}' is not one of {list(LOSS_NAMES)}. Fix: use auto or one of those.")
        if self.mini_batch_size < 1:
            raise ConfigError(f"mini_batch_size: must be at least 1, got {self.mini_batch_size}.")
        if self.max_seq_length is not None and self.max_seq_length < 2:
            raise ConfigError(f"max_seq_length: must be at least 2 tokens, got {self.max_seq_length}.")
