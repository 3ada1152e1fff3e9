"""What every task module provides, and the recipe keys the tasks share (one typed group, ``TaskDataArguments``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from alignkit.data.schemas import Schema
from alignkit.errors import ConfigError, DataError


@dataclass
class TaskDataArguments:
    """Columns, labels and task-specific preprocessing for the classical task heads (recipes/task.py)."""

    label_list: list[str] | None = field(
        default=None, metadata={"help": "token_cls/seq_cls: every label, in id order, e.g. [O, B-PER, I-PER]."}
    )
    text_column: str = field(default="text", metadata={"help": "seq_cls/mlm: the text column."})
    text_pair_column: str | None = field(
        default=None, metadata={"help": "seq_cls: second text of a pair (NLI, paraphrase)."}
    )
    label_column: str = field(
        default="label", metadata={"help": "seq_cls: the label column (a name in label_list, or its id)."}
    )
    tokens_column: str = field(default="tokens", metadata={"help": "token_cls: the column of word lists."})
    tags_column: str = field(
        default="ner_tags", metadata={"help": "token_cls: the column of tag lists (names or ids)."}
    )
    label_all_tokens: bool = field(
        default=False,
        metadata={"help": "token_cls: label every sub-token (B- becomes I- after the first) instead of -100."},
    )
    doc_stride: int = field(
        default=128, metadata={"help": "qa: tokens shared by consecutive windows of a long context."}
    )
    n_best_size: int = field(default=20, metadata={"help": "qa: start/end candidates per window in post-processing."})
    max_answer_length: int = field(default=30, metadata={"help": "qa: longest answer span, in tokens."})
    whole_word_masking: bool = field(default=True, metadata={"help": "mlm: mask all sub-tokens of a word together."})
    mlm_probability: float = field(default=0.15, metadata={"help": "mlm: fraction of words (tokens) masked."})
    source_column: str = field(default="source", metadata={"help": "seq2seq: the input text column."})
    target_column: str = field(default="target", metadata={"help": "seq2seq: the output text column."})
    source_prefix: str = field(
        default="", metadata={"help": "seq2seq: text put before every source (T5: 'translate ...: ')."}
    )
    max_target_length: int = field(default=128, metadata={"help": "seq2seq: max target tokens."})

    def __post_init__(self):
        if self.doc_stride <= 0 or self.n_best_size <= 0 or self.max_answer_length <= 0:
            raise ConfigError("doc_stride, n_best_size and max_answer_length must be positive.")
        if not 0 < self.mlm_probability < 1:
            raise ConfigError(f"mlm_probability: must be between 0 and 1, got {self.mlm_probability}.")


class Task:
    """Preprocessing, collation, metrics and post-processing of one task. The recipe builds the trainer around it.

    ``preprocess`` turns the checked rows into model-ready features (only model and collator columns).
    """

    name = ""
    generates = False  # Seq2SeqTrainer: generate at eval (predict_with_generate)
    evaluate_before_training = False  # report the eval metrics of the untrained model too
    compute_metrics = None
    preprocess_logits_for_metrics = None

    def __init__(self, args: TaskDataArguments, tokenizer, train_args):
        self.args, self.tokenizer, self.train_args = args, tokenizer, train_args
        self.max_length = train_args.max_length

    @property
    def schema(self) -> Schema:
        raise NotImplementedError

    def head_kwargs(self) -> dict:
        return {}

    def preprocess(self, datasets):
        raise NotImplementedError

    def collator(self, model):
        raise NotImplementedError

    def _map(self, datasets, function):
        """Apply a batched feature function to every split, dropping the raw columns."""
        return datasets.map(
            function, batched=True, remove_columns=datasets["train"].column_names, desc=f"{self.name} features"
        )


class Labels:
    """The label set of a classification head: names in id order, and a row-level lookup with file/row errors."""

    def __init__(self, label_list: list[str] | None, task: str):
        if not label_list:
            raise ConfigError(
                f"label_list: {task} needs its labels in id order. Fix: add e.g. 'label_list: [O, B-PER, I-PER]'."
            )
        if len(set(label_list)) != len(label_list):
            raise ConfigError(f"label_list: has duplicates {label_list}. Fix: list every label once.")
        self.names = [str(name) for name in label_list]
        self.ids = {name: i for i, name in enumerate(self.names)}

    def id_of(self, value, source: str, row: int, column: str) -> int:
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise DataError(
                source, row, f"'{column}' value {value!r} is not a label name or id", f"use one of {self.names}"
            )
        if isinstance(value, int):
            if 0 <= value < len(self.names):
                return value
            raise DataError(
                source,
                row,
                f"'{column}' id {value} is outside 0..{len(self.names) - 1}",
                "fix the id or extend label_list",
            )
        if value not in self.ids:
            raise DataError(
                source,
                row,
                f"'{column}' label '{value}' is not in label_list {self.names}",
                "add it to label_list, or fix the row",
            )
        return self.ids[value]

    def head_kwargs(self) -> dict:
        return {"num_labels": len(self.names), "id2label": dict(enumerate(self.names)), "label2id": dict(self.ids)}


def require_text(value, source: str, row: int, column: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise DataError(
            source, row, f"'{column}' is empty or not text", f"give every row a non-empty '{column}', or drop the row"
        )
