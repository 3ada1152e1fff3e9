"""Word-level tasks tokenize the same way in training, evaluation and predict() (issue 16, case 4), for a WordPiece
(tiny:bert), a SentencePiece-style BPE (tiny:llama_base) and a byte-level BPE (tiny:llama) tokenizer: training's
encoding of a word list is the tokenizer's encoding of the words as running text, and predict() on that text finds
exactly the entities the eval metric scores (agreement 1.0)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_DATA, run_recipe

ROWS = [json.loads(line) for line in (TINY_DATA / "tasks" / "ner.jsonl").read_text().splitlines()][:24]


@pytest.mark.parametrize("kind", ["bert", "llama_base", "llama"], ids=["wordpiece", "sentencepiece", "byte-bpe"])
def test_training_encoding_and_predict_agree(kind, tmp_path):
    from datasets import Dataset, DatasetDict
    from transformers import AutoTokenizer

    from alignkit.config import AdapterArguments, ModelArguments, QuantizationArguments
    from alignkit.models import load_model
    from alignkit.tasks.token_classification import TokenClassification, _group, predict, word_tags

    out = tmp_path / kind
    argv = ["--config", "recipes/tiny/task_ner.yaml", "--model_name_or_path", f"tiny:{kind}", "--max_steps", "10"]
    run_recipe("task", [*argv, "--load_in_4bit", "false", "--output_dir", str(out), "--disable_tqdm", "true"])
    config = json.loads((out / "alignkit_run.json").read_text())["lineage"][-1]["config"]
    labels = config["TokenClassificationArguments"]["label_list"]
    model = load_model(
        ModelArguments(model_name_or_path=str(out)), QuantizationArguments(load_in_4bit=False), AdapterArguments(),
        "token_cls", num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    ).eval()  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(out)

    class Args:  # the task's own keys, as the recipe resolved them
        label_list, tokens_column, tags_column, label_all_tokens = labels, "tokens", "ner_tags", False

    class TrainArgs:
        max_length = 64

    task = TokenClassification(Args, tokenizer, TrainArgs)
    features = task.preprocess(DatasetDict(train=Dataset.from_list(ROWS)))["train"]
    agree = 0
    for row, encoded in zip(ROWS, features):
        text = " ".join(row["tokens"])
        # training's encoding is the running text's encoding (is_split_into_words would differ for both BPEs)
        assert encoded["input_ids"] == tokenizer(text, truncation=True, max_length=64)["input_ids"], kind
        with torch.no_grad():
            probs = model(input_ids=torch.tensor([encoded["input_ids"]])).logits[0].softmax(-1)
        firsts = [i for i, label in enumerate(encoded["labels"]) if label != -100]  # what the eval metric scores
        assert len(firsts) == len(row["tokens"])
        evaluated = word_tags(probs, _word_of(firsts, len(probs)), len(firsts))
        spans, start = [], 0
        for word in row["tokens"]:
            spans.append((start, start + len(word)))
            start += len(word) + 1
        expected = [(e["entity_group"], e["start"], e["end"]) for e in _group(evaluated, spans, text, labels)]
        got = [(e["entity_group"], e["start"], e["end"]) for e in predict(model, tokenizer, text, max_length=64)]
        agree += expected == got
    assert agree == len(ROWS), f"{kind}: predict() agrees with the evaluated tags on {agree} of {len(ROWS)} rows"


def _word_of(firsts: list[int], length: int) -> list[int | None]:
    """Token -> word for the first sub-token positions only (the rest None): word_tags reads the first one."""
    owner: list[int | None] = [None] * length
    for word, position in enumerate(firsts):
        owner[position] = word
    return owner
