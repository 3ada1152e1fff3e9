"""Sequence classification (sentiment, topics) of single texts or text pairs: accuracy and macro-F1."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from alignkit.data.schemas import Schema
from alignkit.tasks.base import LabelArguments, Labels, Task, require_text


def classification_metrics(labels, predictions) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "macro_f1": float(f1_score(labels, predictions, average="macro")),
    }


@dataclass
class SequenceClassificationArguments(LabelArguments):
    """seq_cls: a text (or a pair of texts) and its label."""

    text_column: str = field(default="text", metadata={"help": "seq_cls/mlm: the text column."})
    text_pair_column: str | None = field(
        default=None, metadata={"help": "seq_cls: second text of a pair (NLI, paraphrase)."}
    )
    label_column: str = field(
        default="label",
        metadata={
            "help": "seq_cls: the label column (a name in label_list, or its id; numbers are names if all labels are)."
        },
    )


class SequenceClassification(Task):
    name = "seq_cls"
    Arguments = SequenceClassificationArguments

    def __init__(self, args, tokenizer, train_args):
        super().__init__(args, tokenizer, train_args)
        self.labels = Labels(args.label_list, self.name)
        self.text_columns = tuple(c for c in (args.text_column, args.text_pair_column) if c)

    @property
    def schema(self) -> Schema:
        label_col = self.args.label_column

        def check_row(row, source, i):
            for column in self.text_columns:
                require_text(row[column], source, i, column)
            self.labels.id_of(row[label_col], source, i, label_col)

        wanted = " and ".join(f"'{c}'" for c in (*self.text_columns, label_col))
        return Schema(self.name, ((*self.text_columns, label_col),), check_row, f"give each row {wanted}")

    def head_kwargs(self) -> dict:
        return self.labels.head_kwargs()

    def preprocess(self, datasets):
        def features(batch):
            texts = [batch[c] for c in self.text_columns]
            enc = self.tokenizer(*texts, truncation=True, max_length=self.max_length)
            enc["labels"] = [self.labels.lookup(v) for v in batch[self.args.label_column]]
            return enc

        return self._map(datasets, features)

    def collator(self, model):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(self.tokenizer)

    def compute_metrics(self, eval_pred) -> dict[str, float]:
        return classification_metrics(eval_pred.label_ids, np.argmax(eval_pred.predictions, axis=-1))
