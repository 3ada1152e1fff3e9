"""Labels that are whole numbers (star ratings 1-5, sentiment -1/0/1, Yelp's 1/2) are label names in the data, as
transformers' run_classification maps label values: an integer is never read as a position in label_list then, which
would shift every label by one (or swap two) without a word. Other label lists keep integers as ids."""

from types import SimpleNamespace

import pytest
from datasets import Dataset, DatasetDict

from alignkit.errors import DataError
from alignkit.tasks.classification import SequenceClassification, SequenceClassificationArguments
from alignkit.tasks.token_classification import TokenClassification, TokenClassificationArguments
from alignkit.testing.tiny import tiny_tokenizer

TRAIN_ARGS = SimpleNamespace(max_length=32)  # what a task reads of the training arguments


def _seq_cls(label_list, labels):
    task = SequenceClassification(
        SequenceClassificationArguments(label_list=label_list), tiny_tokenizer("bert"), TRAIN_ARGS
    )
    rows = Dataset.from_list([{"text": "the cat sat", "label": v} for v in labels])
    for i, row in enumerate(rows):
        task.labels.id_of(row["label"], "data.jsonl", i + 1, "label")  # the schema's row check
    return task, task.preprocess(DatasetDict(train=rows))["train"]["labels"]


@pytest.mark.parametrize(
    ("label_list", "labels", "ids"),
    [
        ([1, 2, 3, 4, 5], [5, 1, 3], [4, 0, 2]),  # star ratings: 5 is the last label, not an id past the end
        ([1, 0], [0, 1, 1], [1, 0, 0]),  # numbers listed in another order: by name, not swapped
        ([-1, 0, 1], [-1, 1], [0, 2]),
        (["1", "2"], [2, 1], [1, 0]),  # names written as text in the recipe, numbers in the data (a CSV)
        (["neg", "pos"], [1, 0], [1, 0]),  # names that are not numbers: an integer is still an id
    ],
)
def test_integer_labels_are_names_when_every_label_is_a_number(label_list, labels, ids):
    task, features = _seq_cls(label_list, labels)
    assert features == ids
    assert task.labels.head_kwargs()["id2label"] == dict(enumerate(str(n) for n in label_list))


def test_an_integer_that_is_no_numeric_label_names_its_row():
    with pytest.raises(DataError) as info:
        _seq_cls([1, 2], [1, 0])
    assert info.value.row == 2 and "0" in info.value.problem and "label_list" in info.value.problem


def test_token_tags_that_are_numbers_are_names_too():
    tokenizer = tiny_tokenizer("bert")
    args = TokenClassificationArguments(label_list=[2, 1, 0])
    task = TokenClassification(args, tokenizer, TRAIN_ARGS)
    rows = Dataset.from_list([{"tokens": ["the", "cat"], "ner_tags": [0, 2]}])
    labels = task.preprocess(DatasetDict(train=rows))["train"]["labels"][0]
    assert [t for t in labels if t != -100] == [2, 0]
