"""Data sources: every local format loads, mixture weights give the expected row counts (a weight > 1 upsamples),
splits come from a source's test split or a fraction, and unreadable input names the file and line."""

import json
from collections import Counter

import datasets
import pytest
from conftest import write_jsonl

from alignkit.config import DataArguments
from alignkit.data import CPT, SFT, load_datasets
from alignkit.errors import DataError

TEXTS = [{"text": f"row {i} says {i} plus {i} makes {2 * i}."} for i in range(10)]


def _texts(dataset):
    return sorted(dataset["text"])


def _write(fmt: str, tmp_path):
    """The same ten rows in one local format; returns the path a recipe would name."""
    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        write_jsonl(path, TEXTS)
    elif fmt == "json":  # a JSON array (the .json form of line-delimited JSON is covered by jsonl)
        path.write_text(json.dumps(TEXTS))
    elif fmt in ("parquet", "csv"):
        frame = datasets.Dataset.from_list(TEXTS)
        frame.to_parquet(str(path)) if fmt == "parquet" else frame.to_csv(str(path), index=False)
    elif fmt == "save_to_disk":
        path = tmp_path / "saved"
        datasets.Dataset.from_list(TEXTS).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv", "save_to_disk"])
def test_every_local_format_loads(fmt, tmp_path):
    path = _write(fmt, tmp_path)
    loaded = load_datasets(DataArguments(datasets=[str(path)]), CPT)
    assert list(loaded) == ["train"] and _texts(loaded["train"]) == _texts(datasets.Dataset.from_list(TEXTS))


def test_save_to_disk_dataset_dict_gives_its_test_split(tmp_path):
    chat = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(6)
    ]
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(chat[:4]), "test": datasets.Dataset.from_list(chat[4:])}
    ).save_to_disk(str(tmp_path / "dd"))
    loaded = load_datasets(DataArguments(datasets=[{"path": str(tmp_path / "dd"), "test_split": "test"}]), SFT)
    assert {k: len(v) for k, v in loaded.items()} == {"train": 4, "test": 2}
    with pytest.raises(DataError, match="has no split 'validation'"):
        load_datasets(DataArguments(datasets=[{"path": str(tmp_path / "dd"), "split": "validation"}]), SFT)


def test_bad_json_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": "fine too"}\n{"text": "no closing quote}\n')
    with pytest.raises(
        DataError, match=r"broken\.jsonl, row 4: line is not valid JSON.*Fix: make each line one JSON object"
    ) as err:
        load_datasets(DataArguments(datasets=[str(path)]), CPT)
    assert err.value.source == str(path) and err.value.row == 4  # the file's line number, blank lines counted
    path.write_text('{"text": "fine"}\n["a", "list"]\n')
    with pytest.raises(DataError, match=r"row 2: line is not a JSON object"):
        load_datasets(DataArguments(datasets=[str(path)]), CPT)


def test_missing_file_and_unreachable_hub_id_are_clear(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_datasets(DataArguments(datasets=[str(tmp_path / "nope.jsonl")]))
    with pytest.raises(DataError, match="not a local file or folder, and loading it from the Hub failed"):
        load_datasets(DataArguments(datasets=["someone/some-dataset"]))  # the Hub is offline in tests


def test_mixture_weights_give_expected_row_counts(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(8)])
    c = write_jsonl(tmp_path / "c.jsonl", [{"text": f"c{i}"} for i in range(6)])
    sources = [{"path": str(a), "weight": 2.5}, {"path": str(b), "weight": 0.5}, {"path": str(c)}]
    train = load_datasets(DataArguments(datasets=sources), CPT)["train"]
    per_source = Counter(t[0] for t in train["text"])
    assert per_source == {"a": 25, "b": 4, "c": 6}
    copies = Counter(t for t in train["text"] if t[0] == "a")
    assert sorted(Counter(copies.values()).items()) == [(2, 5), (3, 5)]  # every row twice, half of them a third time
    assert len(set(t for t in train["text"] if t[0] == "b")) == 4  # downsampling draws distinct rows
    assert train["text"][:10] != sorted(train["text"])[:10]  # sources are shuffled together, not concatenated
    again = load_datasets(DataArguments(datasets=sources), CPT)["train"]
    assert again["text"] == train["text"]  # mixture_seed makes it reproducible


def test_test_size_fraction_and_count(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", TEXTS)
    fraction = load_datasets(DataArguments(datasets=[str(path)], test_size=0.2), CPT)
    assert (len(fraction["train"]), len(fraction["test"])) == (8, 2)
    assert not set(fraction["train"]["text"]) & set(fraction["test"]["text"])
    count = load_datasets(DataArguments(datasets=[str(path)], test_size=3, max_train_samples=5), CPT)
    assert (len(count["train"]), len(count["test"])) == (5, 3)
    with pytest.raises(DataError, match="leaves no training rows"):
        load_datasets(DataArguments(datasets=[str(path)], test_size=10), CPT)


def test_held_out_rows_never_train_even_when_upsampled(tmp_path):
    """test_size is held out before the mixture weights: an upsampled source's copies of an eval row do not train.
    (Splitting after upsampling put 6 of 8 eval rows of a weight-2 source into training too.)"""
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(20)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(10)])
    data = load_datasets(DataArguments(datasets=[{"path": str(a), "weight": 2}, {"path": str(b)}], test_size=8), CPT)
    held = set(data["test"]["text"])
    assert len(data["test"]) == 8 and not held & set(data["train"]["text"])
    counts = Counter(t[0] for t in data["train"]["text"])
    held_a = sum(t[0] == "a" for t in held)
    assert counts == {"a": 2 * (20 - held_a), "b": 10 - (8 - held_a)}  # the weight applies to the training rows


def test_a_glob_of_shards_is_one_source(tmp_path):
    """Issue 19: local folders of shards load as one source, in file-name order; a pattern that matches nothing
    or mixes file types is an error naming it."""
    import json

    import pytest

    from alignkit.config.args import DataArguments
    from alignkit.data.sources import load_datasets
    from alignkit.errors import DataError

    shards = tmp_path / "corpus"
    shards.mkdir()
    for i in range(3):
        (shards / f"part-{i:02d}.jsonl").write_text(
            "".join(json.dumps({"text": f"shard {i} row {j}"}) + "\n" for j in range(4))
        )
    loaded = load_datasets(DataArguments(datasets=[str(shards / "part-*.jsonl")]))
    assert loaded["train"]["text"] == [f"shard {i} row {j}" for i in range(3) for j in range(4)]
    with pytest.raises(DataError, match="matches no file"):
        load_datasets(DataArguments(datasets=[str(shards / "nope-*.jsonl")]))
    (shards / "part-09.csv").write_text("text\nx\n")
    with pytest.raises(DataError, match=r"matches files of types \['.csv', '.jsonl'\]"):
        load_datasets(DataArguments(datasets=[str(shards / "part-*")]))
