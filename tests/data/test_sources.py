"""Data sources: every local format loads, mixture weights give the expected row counts (a weight > 1 upsamples),
splits come from a source's test split or a fraction, and unreadable input names the file and line."""

import json
import re
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
    with pytest.raises(DataError, match="has no split 'dev'"):
        load_datasets(DataArguments(datasets=[{"path": str(tmp_path / "dd"), "split": "dev", "role": "train"}]), SFT)


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


def test_a_file_split_that_names_no_split_is_refused_not_trained(tmp_path):
    """A file holds one split: `split: test` makes it the eval split; `split: tset` (a typo) trained it, held-out rows
    included, without a word. Now a DataError with the closest name; train and the eval names still work."""
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": f"a{i}"} for i in range(6)])
    held = write_jsonl(tmp_path / "held.jsonl", [{"text": f"b{i}"} for i in range(3)])
    for split, match in [("tset", "split 'tset' is not a split.*did you mean split: test"), ("mine", "split 'mine'")]:
        with pytest.raises(DataError, match=match):
            load_datasets(DataArguments(datasets=[str(train), {"path": str(held), "split": split}]), CPT)
    data = load_datasets(DataArguments(datasets=[str(train), {"path": str(held), "split": "Validation"}]), CPT)
    assert {k: len(v) for k, v in data.items()} == {"train": 6, "test": 3}
    data = load_datasets(DataArguments(datasets=[{"path": str(train), "split": "train"}, str(held)]), CPT)
    assert {k: len(v) for k, v in data.items()} == {"train": 9}


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


def test_a_bad_row_in_a_shard_names_the_shard_file_and_its_line(tmp_path):
    """Issue 19: a schema or format error in a glob source names the shard file and the line in it, not the pattern
    and a row count across all shards (JSON lines here; CSV shards are numbered by line the same way)."""
    from alignkit.data import SFT

    shards = tmp_path / "data"
    for i in range(3):
        write_jsonl(shards / f"part-{i:03d}.jsonl", [{"text": f"shard {i} row {j}"} for j in range(4)])
    bad = shards / "part-001.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": "fine too"}\n{"text": "  "}\n')  # line 4, after a blank line
    with pytest.raises(DataError, match=r"part-001\.jsonl, row 4: 'text' is empty or not text") as err:
        load_datasets(DataArguments(datasets=[str(shards / "part-*.jsonl")]), CPT)
    assert (err.value.source, err.value.row) == (str(bad), 4)
    alpaca = [{"instruction": f"Say {j}.", "output": str(j)} for j in range(3)]
    for i in range(3):
        write_jsonl(shards / f"chat-{i:03d}.jsonl", alpaca)
    write_jsonl(shards / "chat-001.jsonl", [*alpaca[:2], {"instruction": "Say nothing.", "output": ""}])
    with pytest.raises(DataError, match=r"chat-001\.jsonl, row 3: alpaca: 'output' is empty") as err:
        load_datasets(DataArguments(datasets=[str(shards / "chat-*.jsonl")]), SFT)
    assert (err.value.source, err.value.row) == (str(shards / "chat-001.jsonl"), 3)
    for i in range(3):
        (shards / f"table-{i}.csv").write_text("text\n" + "".join(f"t{i}{j}\n" for j in range(3)))
    (shards / "table-2.csv").write_text('text\n"a quoted\nrow"\n\n""\n')  # an empty row on line 5
    with pytest.raises(DataError, match=r"table-2\.csv, row 5: 'text' is empty"):
        load_datasets(DataArguments(datasets=[str(shards / "table-*.csv")]), CPT)


@pytest.mark.parametrize(
    "rows, line, column, here, before",
    [
        ([{"prompt": "2+2=", "completion": "4"}] * 2 + [{"prompt": "3+3=", "completion": 6}], 3, "completion", "a number", "text"),
        ([{"text": "a", "label": True}, {"text": "b", "label": None}, {"text": "c", "label": "yes"}], 3, "label", "text", "true/false"),
        ([{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": ["d"]}], 2, "completion", "a list", "text"),
        ([{"messages": [{"role": "user", "content": "hi"}]}, {"messages": [{"role": "user", "content": 42}]}], 2,
         "messages[].content", "a number", "text"),
    ],
    ids=["str-then-int", "bool-then-str", "str-then-list", "nested"],
)  # fmt: skip
def test_a_column_whose_type_changes_names_the_file_line_column_and_both_types(
    rows, line, column, here, before, tmp_path
):
    """Issue 19: datasets' JSON reader cannot hold two types in one column: it fails with a pyarrow error, or (in a
    file's first 10 MB, datasets 5) turns the text "4" into the number 4 without a word. alignkit stops first."""
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_datasets(DataArguments(datasets=[str(path)]))
    assert (err.value.source, err.value.row) == (str(path), line)
    assert re.match(
        rf"'{re.escape(column)}' is {here} \(.+\) here but {before} on line 1: a column holds one type",
        err.value.problem,
    )
    assert err.value.fix.startswith(f"write '{column}' as {before} in every row")
    if {here, before} == {"a number", "text"}:
        assert 'quoted: "4", not 4' in err.value.fix


def test_column_types_are_checked_across_shards_and_in_json_arrays(tmp_path):
    first = write_jsonl(tmp_path / "part-0.jsonl", [{"prompt": "a", "completion": "b"}] * 2)
    second = write_jsonl(tmp_path / "part-1.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": ["d"]}])  # fmt: skip
    with pytest.raises(DataError, match=rf"row 2: 'completion' is a list \(\['d'\]\) here but text on line 1 of {re.escape(str(first))}") as err:  # fmt: skip
        load_datasets(DataArguments(datasets=[str(tmp_path / "part-*.jsonl")]))
    assert err.value.source == str(second)
    array = tmp_path / "array.json"
    array.write_text(json.dumps([{"text": "a", "n": 1}, {"text": "b", "n": 2.5}, {"text": "c", "n": "3"}]))
    with pytest.raises(DataError, match=r"array\.json, row 3: 'n' is text \('3'\) here but a number on row 1"):
        load_datasets(DataArguments(datasets=[str(array)]))  # a JSON array: rows count from 1 (ints and floats mix)
    rows = load_datasets(DataArguments(datasets=[str(first)]))["train"]
    assert rows["completion"] == ["b", "b"]
