"""Padding side is part of the tokenizer contract per task (issue 37, case 4): a checkpoint whose tokenizer pads on
the left (``padding_side: left`` in tokenizer_config.json, as Llama-2-era checkpoints and XLNet ship) trains its
task heads padded on the right, through the recipe: QA start/end labels point at the answer in 64 of 64 windows and
0 of 16 classification rows pool a padding token; the saved tokenizer pads on the right too (inference = training).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import run_recipe, write_jsonl

from alignkit.testing.tiny import tiny_model_path
from alignkit.train import runner

FAST = ["--disable_tqdm", "true", "--save_strategy", "no", "--gradient_checkpointing", "false",
        "--load_in_4bit", "false", "--max_steps", "1", "--seed", "0"]  # fmt: skip


def left_padding(kind: str, tmp_path):
    folder = tmp_path / f"{kind}-left"
    shutil.copytree(tiny_model_path(kind), folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["padding_side"] = "left"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def spy(monkeypatch) -> dict:
    seen: dict = {}
    train = runner.Run.train

    def keep(self, trainer, **kwargs):
        seen["trainer"] = trainer
        return train(self, trainer, **kwargs)

    monkeypatch.setattr(runner.Run, "train", keep)
    return seen


def batches(trainer, n: int, size: int):
    """The first ``n`` training features, collated as the trainer collates them, ``size`` at a time."""
    data = trainer.train_dataset.select(range(n))
    columns = [c for c in data.column_names if c not in ("offset_mapping", "example_index")]
    rows = list(data.select_columns(columns))
    for i in range(0, n, size):
        yield trainer.data_collator(rows[i : i + size])


def qa_rows(n: int) -> list[dict]:
    """Contexts of ~40 facts, longer than one 64-token window; the answer near the end."""
    names, cities = "anna bob carol dave emma frank grace henry".split(), "paris london berlin rome".split()
    rows = []
    for i in range(n):
        facts = [f"{names[(i + j) % 8]} visited {cities[(i * j) % 4]} ." for j in range(12)]
        context = " ".join(facts) + f" {names[i % 8]} lives in {cities[i % 4]} ."
        start = context.rindex(cities[i % 4])
        rows.append({"question": f"where does {names[i % 8]} live ?", "context": context,
                     "answers": {"text": [cities[i % 4]], "answer_start": [start]}})  # fmt: skip
    return rows


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_qa_labels_point_at_the_answer_with_a_left_padding_tokenizer(kind, tmp_path, monkeypatch):
    model = left_padding(kind, tmp_path)
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(40))
    out = tmp_path / "qa"
    argv = ["--task", "qa", "--model_name_or_path", str(model), "--datasets", str(data), "--max_length", "64",
            "--doc_stride", "16", "--per_device_train_batch_size", "8", *FAST]  # fmt: skip
    seen = spy(monkeypatch)
    run_recipe("task", [*argv, "--output_dir", str(out)])
    trainer = seen["trainer"]
    assert trainer.processing_class.padding_side == "right" and len(trainer.train_dataset) >= 64
    assert labels_right(trainer) == (64, True)
    saved = json.loads((out / "tokenizer_config.json").read_text())
    assert saved.get("padding_side", "right") == "right"  # inference pads as training did

    from alignkit.tasks import base

    monkeypatch.setattr(base, "use_padding_side", lambda *args: None)  # the tokenizer as it ships
    run_recipe("task", [*argv, "--output_dir", str(tmp_path / "as-shipped")])
    assert seen["trainer"].processing_class.padding_side == "left"
    assert labels_right(seen["trainer"])[0] == {"bert": 32, "llama": 40}[kind]  # the rest pointed at other tokens


def labels_right(trainer) -> tuple[int, bool]:
    """Of the first 64 windows, how many have start/end labels on the answer (or, without it, on a real first
    token), and whether at least 16 hold the answer."""
    tokenizer = trainer.processing_class
    right, answered = 0, 0
    for batch in batches(trainer, 64, 8):
        for ids, mask, s, e in zip(batch["input_ids"], batch["attention_mask"], batch["start_positions"],
                                   batch["end_positions"]):  # fmt: skip
            if s == e == 0:  # the answer is not in this window: the null span, a real (unpadded) first token
                right += bool(mask[0])
            else:
                answered += 1
                right += tokenizer.decode(ids[s : e + 1]).strip().lower() in ("paris", "london", "berlin", "rome")
    return right, answered >= 16


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_classification_pools_no_padding_with_a_left_padding_tokenizer(kind, tmp_path, monkeypatch):
    model = left_padding(kind, tmp_path)
    words = "good bad great terrible movie film book story the a of".split()
    rows = [{"text": " ".join(words[(i * k) % len(words)] for k in range(2 + i % 9)), "label": ["pos", "neg"][i % 2]}
            for i in range(16)]  # fmt: skip
    data = write_jsonl(tmp_path / "cls.jsonl", rows)
    seen = spy(monkeypatch)
    run_recipe("task", ["--task", "seq_cls", "--model_name_or_path", str(model), "--datasets", str(data),
                        "--label_list", "[pos, neg]", "--max_length", "32", "--per_device_train_batch_size", "16",
                        "--output_dir", str(tmp_path / "cls"), *FAST])  # fmt: skip
    trainer = seen["trainer"]
    (batch,) = batches(trainer, 16, 16)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert int((mask == 0).sum()) > 0  # the rows differ in length: the batch is padded
    if kind == "bert":  # BERT pools the first position ([CLS])
        pooled = ids[:, 0]
    else:  # a decoder pools its last non-padding token (transformers' *ForSequenceClassification)
        pad = trainer.processing_class.pad_token_id
        last = (torch.arange(ids.shape[1]) * (ids != pad)).argmax(-1)
        pooled = ids[torch.arange(len(ids)), last]
    assert int((pooled == trainer.processing_class.pad_token_id).sum()) == 0  # 0 of 16 rows pooled on padding
