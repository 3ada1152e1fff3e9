"""Token classification (NER, POS): words + tags in, sub-word label alignment, seqeval entity metrics, grouped
entities out."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from alignkit.data.schemas import Schema
from alignkit.errors import ConfigError, DataError
from alignkit.tasks.base import LabelArguments, Labels, Task


def align_labels(
    tag_ids: list[int], word_ids: list[int | None], label_all_tokens: bool, continuation_ids: list[int]
) -> list[int]:
    """One label per token: -100 on special tokens; a word's first sub-token gets the word's tag; later sub-tokens
    get -100, or with ``label_all_tokens`` the tag's continuation (B-X -> I-X)."""
    labels, previous = [], None
    for word in word_ids:
        if word is None:
            labels.append(-100)
        elif word != previous:
            labels.append(tag_ids[word])
        else:
            labels.append(continuation_ids[tag_ids[word]] if label_all_tokens else -100)
        previous = word
    return labels


def entity_metrics(true_tags: list[list[str]], predicted_tags: list[list[str]]) -> dict[str, float]:
    """seqeval entity-level precision/recall/F1 (CoNLL rules) and token accuracy."""
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

    return {
        "precision": precision_score(true_tags, predicted_tags, zero_division=0),
        "recall": recall_score(true_tags, predicted_tags, zero_division=0),
        "f1": f1_score(true_tags, predicted_tags, zero_division=0),
        "accuracy": accuracy_score(true_tags, predicted_tags),
    }


@dataclass
class TokenClassificationArguments(LabelArguments):
    """token_cls (NER, POS): word lists and their tags."""

    tokens_column: str = field(default="tokens", metadata={"help": "token_cls: the column of word lists."})
    tags_column: str = field(
        default="ner_tags", metadata={"help": "token_cls: the column of tag lists (names or ids)."}
    )
    label_all_tokens: bool = field(
        default=False,
        metadata={"help": "token_cls: label every sub-token (B- becomes I- after the first) instead of -100."},
    )


class TokenClassification(Task):
    name = "token_cls"
    Arguments = TokenClassificationArguments

    def __init__(self, args, tokenizer, train_args):
        super().__init__(args, tokenizer, train_args)
        self.labels = Labels(args.label_list, self.name)
        if not tokenizer.is_fast:
            raise ConfigError(
                "token_cls: needs a fast tokenizer (word ids per token). Fix: use a model with a tokenizer.json."
            )
        names = self.labels.names
        self.continuation_ids = [
            self.labels.ids.get("I-" + n[2:], i) if n.startswith("B-") else i for i, n in enumerate(names)
        ]

    @property
    def schema(self) -> Schema:
        tokens_col, tags_col = self.args.tokens_column, self.args.tags_column

        def check_row(row, source, i):
            tokens, tags = row[tokens_col], row[tags_col]
            if not isinstance(tokens, list) or not tokens:
                raise DataError(
                    source,
                    i,
                    f"'{tokens_col}' is empty or not a list of words",
                    "give every row at least one word, or drop it",
                )
            for j, token in enumerate(tokens):
                if not isinstance(token, str) or not token.strip():
                    raise DataError(
                        source, i, f"'{tokens_col}'[{j}] is an empty token", "remove empty strings from the word list"
                    )
            if not isinstance(tags, list) or len(tags) != len(tokens):
                n_tags = len(tags) if isinstance(tags, list) else "no"
                raise DataError(
                    source, i, f"{len(tokens)} words but {n_tags} tags", f"give '{tags_col}' one tag per word"
                )
            for tag in tags:
                self.labels.id_of(tag, source, i, tags_col)

        return Schema(
            self.name,
            ((tokens_col, tags_col),),
            check_row,
            f"give each row '{tokens_col}' (words) and '{tags_col}' (one tag per word)",
        )

    def head_kwargs(self) -> dict:
        return self.labels.head_kwargs()

    def preprocess(self, datasets):
        ids = self.labels.ids

        def features(batch):
            enc = self.tokenizer(
                batch[self.args.tokens_column], is_split_into_words=True, truncation=True, max_length=self.max_length
            )
            enc["labels"] = [
                align_labels(
                    [t if isinstance(t, int) else ids[t] for t in tags],
                    enc.word_ids(k),
                    self.args.label_all_tokens,
                    self.continuation_ids,
                )
                for k, tags in enumerate(batch[self.args.tags_column])
            ]
            return enc

        return self._map(datasets, features)

    def collator(self, model):
        from transformers import DataCollatorForTokenClassification

        return DataCollatorForTokenClassification(self.tokenizer)

    def compute_metrics(self, eval_pred) -> dict[str, float]:
        predictions = np.argmax(eval_pred.predictions, axis=-1)
        true_tags, predicted_tags = [], []
        for pred_row, label_row in zip(predictions, eval_pred.label_ids):
            keep = label_row != -100
            true_tags.append([self.labels.names[t] for t in label_row[keep]])
            predicted_tags.append([self.labels.names[p] for p in pred_row[keep]])
        return entity_metrics(true_tags, predicted_tags)


def predict(model, tokenizer, texts: str | list[str], aggregation_strategy: str = "first") -> list:
    """Grouped entities per text, as transformers' token-classification pipeline gives them:
    ``[{'entity_group': 'PER', 'score': 0.98, 'word': 'alice smith', 'start': 0, 'end': 11}, ...]``.

    ``first`` takes each word's label from its first sub-token, which is the token the head was trained on.
    """
    from transformers import pipeline

    model.eval()
    ner = pipeline("token-classification", model=model, tokenizer=tokenizer, aggregation_strategy=aggregation_strategy)
    single = isinstance(texts, str)
    results = ner([texts] if single else list(texts))
    grouped = [[{**e, "score": float(e["score"])} for e in entities] for entities in results]
    return grouped[0] if single else grouped
