"""Streamed sources (issue 19, ``streaming: true``): rows stream in file order with the same content a loaded source
gives, are converted and checked as they stream (the first rows of every shard before training, a bad row further on
when it is reached, with its shard file and line), shuffle only within a buffer, and never touch the datasets cache;
what a stream cannot do (other stages, no max_steps, test_size, weights, save_to_disk folders) is a config or data
error with the fix. Training on a streamed corpus in bounded memory: tests/stages/test_cpt_streaming.py."""

from __future__ import annotations

import json

import datasets
import pytest
from conftest import write_jsonl

from alignkit.config import DataArguments
from alignkit.data import CPT, load_datasets
from alignkit.errors import ConfigError, DataError
from alignkit.stages import STAGES


def _shards(folder, n_shards=3, rows=4, make=lambda i, j: {"text": f"shard {i} row {j}"}):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_shards):
        write_jsonl(folder / f"part-{i:03d}.jsonl", [make(i, j) for j in range(rows)])
    return str(folder / "part-*.jsonl")


def _stream(path, **data):
    source = {"path": path, "streaming": True, **data.pop("source", {})}
    return load_datasets(DataArguments(datasets=[source], **data), CPT)


def _cached(folder):
    return [p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".lock")]


def test_a_streamed_glob_gives_the_rows_a_loaded_one_does_in_file_order(tmp_path, monkeypatch):
    pattern = _shards(tmp_path / "corpus")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "loaded_cache"))
    loaded = load_datasets(DataArguments(datasets=[pattern]), CPT)["train"]
    assert _cached(tmp_path / "loaded_cache")  # a loaded source is written to the cache as Arrow
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    streamed = _stream(pattern)
    assert list(streamed) == ["train"] and isinstance(streamed["train"], datasets.IterableDataset)
    assert (
        [r["text"] for r in streamed["train"]]
        == loaded["text"]
        == [f"shard {i} row {j}" for i in range(3) for j in range(4)]
    )
    # renamed columns, a .txt corpus (one row per line), and max_train_samples take from the stream's start
    body = _shards(tmp_path / "body", make=lambda i, j: {"body": f"b{i}{j}", "id": j})
    renamed = _stream(body, source={"columns": {"text": "body"}}, max_train_samples=5)["train"]
    assert list(renamed) == [{"text": t} for t in ["b00", "b01", "b02", "b03", "b10"]]
    (tmp_path / "plain.txt").write_text("first line\nsecond line\n")
    assert [r["text"] for r in _stream(str(tmp_path / "plain.txt"))["train"]] == ["first line", "second line"]
    assert not _cached(tmp_path / "cache"), "streaming wrote to the datasets cache"


def test_shuffling_is_only_within_the_buffer_and_seeded(tmp_path):
    pattern = _shards(tmp_path / "corpus", n_shards=4, rows=25)
    in_order = [r["text"] for r in _stream(pattern)["train"]]
    shuffled = [r["text"] for r in _stream(pattern, streaming_shuffle_buffer=10)["train"]]
    assert sorted(shuffled) == sorted(in_order) and shuffled != in_order
    assert shuffled == [r["text"] for r in _stream(pattern, streaming_shuffle_buffer=10)["train"]]  # mixture_seed
    assert shuffled != [r["text"] for r in _stream(pattern, streaming_shuffle_buffer=10, mixture_seed=7)["train"]]


def test_bad_rows_fail_before_training_when_early_and_when_reached_later(tmp_path):
    """The first streaming_check_rows rows of every shard are checked when the data loads; a bad row further on
    fails as the stream reaches it. Either way the error names the shard file and its line."""
    corpus = tmp_path / "corpus"
    pattern = _shards(corpus)
    shard = corpus / "part-001.jsonl"
    shard.write_text('{"text": "fine"}\n\n{"text": ""}\n')  # line 3 of the 2nd shard, after a blank line
    with pytest.raises(DataError, match=r"part-001\.jsonl, row 3: 'text' is empty") as err:
        _stream(pattern)
    assert (err.value.source, err.value.row) == (str(shard), 3)
    shard.write_text('{"text": "fine"}\n{"text": "fine"}\n{"text": "no closing quote}\n')
    train = _stream(pattern, streaming_check_rows=2)["train"]  # the bad line is past the checked rows
    with pytest.raises(DataError, match=r"part-001\.jsonl, row 3: line is not valid JSON") as err:
        list(train)
    assert (err.value.source, err.value.row) == (str(shard), 3)
    shard.write_text('{"text": "fine"}\n{"body": "no text column"}\n')
    with pytest.raises(DataError, match=r"part-001\.jsonl, row 2: has no 'text' column"):
        _stream(pattern)


def test_what_cannot_stream_is_refused_with_the_fix(tmp_path):
    pattern = _shards(tmp_path / "corpus")
    datasets.Dataset.from_list([{"text": "a"}]).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError, match=r"save_to_disk folder, which cannot be streamed.*Fix: set streaming: false"):
        _stream(str(tmp_path / "saved"))
    (tmp_path / "array.json").write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    with pytest.raises(DataError, match=r"one JSON array, which cannot be read row by row.*\.jsonl"):
        _stream(str(tmp_path / "array.json"))
    with pytest.raises(ConfigError, match=r"test_size 0.1 with a streamed source.*Fix: set test_size: 0"):
        DataArguments(datasets=[{"path": pattern, "streaming": True}], test_size=0.1)
    with pytest.raises(ConfigError, match=r"weight 2 with streaming.*Fix: drop the weight"):
        DataArguments(datasets=[{"path": pattern, "streaming": True, "weight": 2}])
    with pytest.raises(ConfigError, match=r"streaming: 'yes' is not true or false"):
        DataArguments(datasets=[{"path": pattern, "streaming": "yes"}])

    def parse(stage, *argv):
        recipe = f"recipes/tiny/{stage}.yaml"
        return STAGES[stage].parse(["--config", recipe, "--test_size", "0", "--datasets", f"{{path: '{pattern}', streaming: true}}", *argv])  # fmt: skip

    with pytest.raises(ConfigError, match=r"streaming: only the cpt stage streams.*Fix: remove streaming: true"):
        parse("sft")
    with pytest.raises(ConfigError, match=r"streaming with max_steps -1: a stream has no length.*Fix: set max_steps"):
        parse("cpt", "--max_steps", "-1")
    assert parse("cpt").data.datasets[0].streaming


def test_a_streamed_folder_streams_its_test_split_and_mixes_with_a_loaded_source(tmp_path):
    folder = tmp_path / "folder"
    write_jsonl(folder / "train.jsonl", [{"text": f"train {i}"} for i in range(3)])
    write_jsonl(folder / "test.jsonl", [{"text": f"test {i}"} for i in range(2)])
    loaded = write_jsonl(tmp_path / "small.jsonl", [{"text": f"small {i}"} for i in range(2)])
    data = load_datasets(
        DataArguments(datasets=[{"path": str(folder), "streaming": True, "test_split": "test"}, str(loaded)]), CPT
    )
    assert [r["text"] for r in data["train"]] == ["train 0", "train 1", "train 2", "small 0", "small 1"]
    assert [r["text"] for r in data["test"]] == ["test 0", "test 1"]
    with pytest.raises(DataError, match=r"has no split 'dev'"):
        load_datasets(
            DataArguments(datasets=[{"path": str(folder), "streaming": True, "split": "dev", "role": "train"}]), CPT
        )


def test_data_preview_of_a_streamed_source_reads_only_what_it_shows(tmp_path, capsys):
    from alignkit.cli import data

    pattern = _shards(tmp_path / "corpus")
    (tmp_path / "corpus" / "part-002.jsonl").write_text('{"text": "fine"}\n' * 3 + '{"text": ""}\n')  # past the checks
    argv = ["preview", "cpt", "--config", "recipes/tiny/cpt.yaml", "--test_size", "0", "--n", "2",
            "--datasets", f"{{path: '{pattern}', streaming: true}}", "--streaming_check_rows", "3"]  # fmt: skip
    assert data(argv) == 0
    out = capsys.readouterr().out
    assert "format text (detected); streamed: the first 3 rows of each file pass the cpt checks" in out
    assert '{"text": "shard 0 row 1"}' in out and "shard 0 row 2" not in out
