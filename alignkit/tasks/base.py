"""What every task module provides: the :class:`Task` interface and registry, and helpers the tasks share."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from alignkit.data.schemas import Schema
from alignkit.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


@dataclass
class LabelArguments:
    """Keys shared by the classification heads."""

    label_list: list[str] | None = field(
        default=None, metadata={"help": "token_cls/seq_cls: every label, in id order, e.g. [O, B-PER, I-PER]."}
    )


class Task:
    """Preprocessing, collation, metrics and post-processing of one task. The recipe builds the trainer around it.

    A subclass is a task: ``name`` is its ``task:`` value and its model head (a row of alignkit.models.heads.HEADS),
    ``Arguments`` the dataclass of its own recipe keys. Subclasses register themselves (``REGISTRY``) when their
    module is imported; alignkit.tasks imports every module of the package.

    ``preprocess`` turns the checked rows into model-ready features (only model and collator columns).
    """

    REGISTRY: dict[str, type[Task]] = {}
    name = ""
    Arguments: type | None = None
    generates = False  # Seq2SeqTrainer: generate at eval (predict_with_generate)
    evaluate_before_training = False  # report the eval metrics of the untrained model too
    # Every task head pads on the right: labels are token positions (qa, token_cls), a head pools a fixed position
    # (BERT's [CLS] at 0), or an encoder's positions count from its first token (seq2seq). Left padding is for
    # decoder-only generation, which no task head does. The saved tokenizer keeps it, so inference pads the same way.
    padding_side = "right"
    compute_metrics = None
    preprocess_logits_for_metrics = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:
            Task.REGISTRY[cls.name] = cls

    def __init__(self, args, tokenizer, train_args):
        self.args, self.tokenizer, self.train_args = args, tokenizer, train_args
        self.max_length = train_args.max_length
        use_padding_side(tokenizer, self.padding_side, self.name)
        self.max_truncated_fraction = 1.0  # share of a split's rows max_length may cut (build_task: the run key)

    @classmethod
    def configure(cls, recipe) -> None:
        """Fill in what the task derives from the recipe's other keys, once, when the recipe is parsed (so the
        resolved config that is saved, and compared on resume, holds it)."""

    @classmethod
    def inference(cls, recipe) -> dict:
        """How the trained model is used, as the run trained and scored it (``inference`` in ``alignkit_run.json``,
        read back by the task's ``predict`` and the run summary's hint): e.g. token_cls
        ``{aggregation_strategy: first}``, qa its windows. Plain JSON values; {} when the task has nothing to say."""
        return {}

    @property
    def schema(self) -> Schema:
        raise NotImplementedError

    def head_kwargs(self) -> dict:
        return {}

    @property
    def trainer_class(self) -> type:
        """The transformers trainer the recipe builds around the task: ``Seq2SeqTrainer`` when it generates at eval
        (``generates``: predict_with_generate), else ``Trainer``. Resolved here so that recipes/task.py imports
        nothing before alignkit (whose import installs alignkit.quiet's filters)."""
        from transformers import Seq2SeqTrainer, Trainer

        return Seq2SeqTrainer if self.generates else Trainer

    def preprocess(self, datasets):
        raise NotImplementedError

    def collator(self, model):
        raise NotImplementedError

    def _map(self, datasets, function):
        """Apply a batched feature function to every split, dropping the raw columns."""
        return datasets.map(
            function, batched=True, remove_columns=datasets["train"].column_names, desc=f"{self.name} features"
        )


def use_padding_side(tokenizer, side: str, task: str) -> None:
    """Set ``tokenizer.padding_side`` to the task's (a tokenizer contract change, logged): a checkpoint that ships
    ``padding_side: left`` (Llama-2-era, XLNet) would otherwise shift every QA start/end label and pool [PAD]."""
    current = getattr(tokenizer, "padding_side", side)
    if current != side:
        tokenizer.padding_side = side
        change = (
            f"{task}: padding_side was {current!r}; set to {side!r} (labels and pooled positions count from the left)"
        )
        getattr(tokenizer, "alignkit_changes", []).append(change)
        logger.warning("tokenizer contract: %s", change)


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
        # Labels that are all whole numbers (star ratings 1-5, sentiment -1/0/1, Yelp's 1/2): an integer in the data
        # is a label name, as transformers' run_classification maps label values, never a position in the list (which
        # would shift every label by one, or swap them, silently).
        self.numeric_names = all(re.fullmatch(r"-?\d+", name) for name in self.names)

    def lookup(self, value) -> int:
        """The id of a checked label value (:meth:`id_of`): a name, or an integer id (a name when the names are
        numbers)."""
        if isinstance(value, int) and not self.numeric_names:
            return value
        return self.ids[str(value)]

    def id_of(self, value, source: str, row: int, column: str) -> int:
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise DataError(
                source, row, f"'{column}' value {value!r} is not a label name or id", f"use one of {self.names}"
            )
        if isinstance(value, int) and self.numeric_names:
            if str(value) in self.ids:
                return self.ids[str(value)]
            raise DataError(
                source,
                row,
                f"'{column}' label {value} is not in label_list {self.names} (whole numbers in the data are label "
                "names when every label is one)",
                "add it to label_list, or fix the row",
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
