"""Public data sets as they come (issue 39), read from files written in their published layouts
(alignkit.testing.published): a held-out file is the eval split and never trains, a folder of CoNLL files is read as
CoNLL, compressed files load like plain ones with rows named by their line, and the bad-row policy skips and lists
hh-rlhf's broken records."""

import bz2
import gzip
import json
import lzma

import datasets
import pytest

from alignkit.config import DataArguments
from alignkit.data import load_datasets
from alignkit.data.pairing import row_key
from alignkit.data.schemas import DPO, KTO, SFT
from alignkit.errors import ConfigError, DataError
from alignkit.testing.published import alpaca_records, hh_records, write_conll, write_hh, write_squad


def _load(sources, schema=None, **kw):
    return load_datasets(DataArguments(datasets=sources, **kw), schema)


def _no_eval_row_trains(loaded):
    trained = {row_key(r) for r in loaded["train"]}
    assert not [r for r in loaded["test"] if row_key(r) in trained]


# ------------------------------------------------------------------ 1. a held-out file as the eval split
@pytest.mark.parametrize("marker", [{"split": "test"}, {"role": "eval"}, {"split": "validation"}])
def test_a_held_out_conll_file_is_the_eval_split_and_never_trains(tmp_path, marker):
    train, test = write_conll(tmp_path)
    loaded = _load([str(train), {"path": str(test), **marker}])
    assert (len(loaded["train"]), len(loaded["test"])) == (12, 8)  # every sentence of each file, on its own side
    _no_eval_row_trains(loaded)
    assert loaded.alignkit_report["held_out"] == {"sources": [f"{test} [eval]"], "rows": 8, "also_in_train": 0}


def test_test_size_left_in_the_recipe_gives_way_to_the_held_out_file(tmp_path, caplog):
    train, dev = write_squad(tmp_path)
    loaded = _load([str(train), {"path": str(dev), "split": "test"}], test_size=0.2)
    assert (len(loaded["train"]), len(loaded["test"])) == (12, 8)  # no training row held out, no dev row trained
    assert set(loaded["test"]["id"]) == {f"d{k}{q}" for k in range(4) for q in range(2)}
    assert "test_size 0.2 is not used: the eval split is" in caplog.text


def test_a_source_cannot_be_both_and_something_must_train(tmp_path):
    train, test = write_conll(tmp_path)
    with pytest.raises(ConfigError, match="not both"):
        _load([{"path": str(tmp_path), "role": "eval", "test_split": "test"}])
    with pytest.raises(ConfigError, match="nothing trains"):
        _load([{"path": str(test), "split": "test"}])
    with pytest.raises(DataError, match="role: eval"):  # the fix a test_split on one file gives is the one above
        _load([{"path": str(train), "test_split": "test"}])
    loaded = _load([{"path": str(test), "split": "test", "role": "train"}])  # on purpose: it trains
    assert len(loaded["train"]) == 8 and "test" not in loaded


def test_a_folder_of_conll_files_is_read_as_conll_split_by_file_name(tmp_path):
    write_conll(tmp_path / "conll")
    loaded = _load([{"path": str(tmp_path / "conll"), "test_split": "test"}])
    assert loaded["train"].column_names == ["tokens", "ner_tags"]  # not datasets' text reader: tags kept
    assert (len(loaded["train"]), len(loaded["test"])) == (12, 8)
    assert loaded["train"][0] == {"tokens": ["Alice", "lives", "in", "Paris", "."],
                                  "ner_tags": ["B-PER", "O", "O", "B-LOC", "O"]}  # fmt: skip
    _no_eval_row_trains(loaded)
    glob = _load([str(tmp_path / "conll" / "*.conll")])  # a glob is one split
    assert len(glob["train"]) == 20
    (tmp_path / "conll" / "train.conll").write_text("Alice NNP B-NP I-PER\n\nBob NNP I-PER\n")
    with pytest.raises(DataError, match=r"conll/train\.conll, row 3: has 3 columns"):  # file and line named
        _load([{"path": str(tmp_path / "conll")}])


# ------------------------------------------------------------------ 2. compressed files
@pytest.mark.parametrize("opener,suffix", [(gzip.open, "gz"), (bz2.open, "bz2"), (lzma.open, "xz")])
@pytest.mark.parametrize("kind", ["jsonl", "json", "csv"])
def test_compressed_files_load_like_the_plain_ones(tmp_path, opener, suffix, kind):
    rows = [{"prompt": f"question {i}?", "completion": f"answer {i}."} for i in range(6)]
    plain = tmp_path / f"data.{kind}"
    if kind == "jsonl":
        plain.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        plain.write_text(json.dumps(rows))
    else:
        datasets.Dataset.from_list(rows).to_csv(str(plain), index=False)
    packed = tmp_path / f"data.{kind}.{suffix}"
    with opener(packed, "wb") as f:
        f.write(plain.read_bytes())
    assert _load([str(packed)], SFT)["train"].to_list() == _load([str(plain)], SFT)["train"].to_list()


def test_a_bad_row_in_a_compressed_file_names_its_line(tmp_path):
    rows = [{"prompt": "q", "completion": "a"}] * 3 + [{"prompt": "q", "completion": ""}]
    path = tmp_path / "data.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + "\n".join(json.dumps(r) for r in rows[2:]))
    with pytest.raises(DataError, match=r"data\.jsonl\.gz, row 5: 'completion' is empty"):
        _load([str(path)], SFT)
    path.write_bytes(gzip.compress(b'{"prompt": "q", "completion": "a"}\n{"prompt": ')[:-4])  # a cut download
    with pytest.raises(DataError, match=r"data\.jsonl\.gz: cannot be read .*compress the file again"):
        _load([str(path)], SFT)


# ------------------------------------------------------------------ 3. the bad-row policy on hh-rlhf as published
@pytest.mark.parametrize("schema", [SFT, DPO, KTO], ids=["sft", "dpo", "kto"])
def test_hh_jsonl_gz_skips_the_empty_reply_and_lists_it(tmp_path, schema):
    path = write_hh(tmp_path / "harmless-base" / "train.jsonl.gz", n=12)
    with pytest.raises(DataError, match=r"train\.jsonl\.gz, row 4: hh: turn 4 \(assistant\) is empty"):
        _load([str(path)], schema)  # the default stays: stop, naming the row
    loaded = _load([str(path)], schema, on_bad_rows="skip", max_bad_rows=1)
    assert len(loaded["train"]) == (11 if schema is not KTO else 22)
    report = loaded.alignkit_report
    assert report["skipped_rows"] == 1
    assert report["skipped"] == [{"file": str(path), "row": 4, "problem": "hh: turn 4 (assistant) is empty (the "
                                  "transcript ends on '\\n\\nAssistant:' with no reply)"}]  # fmt: skip
    if schema is DPO:  # record 7's replies repeat the question: a genuine reply, trained as it is
        question = hh_records()[6]["chosen"].split("\n\nHuman: ")[-1].split("\n\nAssistant:")[0]
        assert any(r["chosen"][0]["content"].startswith(question) for r in loaded["train"])


def test_more_bad_rows_than_the_cap_is_an_error_naming_them(tmp_path):
    rows = [{"instruction": f"say {i}", "output": "" if i % 3 == 0 else f"{i}"} for i in range(12)]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"more than max_bad_rows \(2: 2 of its 12 rows\) are bad \(row 1: alpaca: "):
        _load([str(path)], SFT, on_bad_rows="skip", max_bad_rows=2)
    loaded = _load([str(path)], SFT, on_bad_rows="skip", max_bad_rows=0.34)
    assert len(loaded["train"]) == 8 and [s["row"] for s in loaded.alignkit_report["skipped"]] == [1, 4, 7, 10]


def test_a_column_fault_is_never_skipped(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(DataError, match="missing columns"):
        _load([str(path)], SFT, on_bad_rows="skip", max_bad_rows=0.5)


def test_alpaca_demo_array_loads(tmp_path):
    path = tmp_path / "alpaca_en_demo.json"
    path.write_text(json.dumps(alpaca_records(8), indent=2))
    with pytest.raises(DataError, match=r"alpaca_en_demo\.json \[eval\], row 1: its prompt .* is also the prompt"):
        _load([str(path), {"path": str(path), "role": "eval"}], SFT)  # the same file as eval: never scored as held out
    held = tmp_path / "held_out.json"
    held.write_text(json.dumps([{**r, "instruction": r["instruction"] + " Briefly."} for r in alpaca_records(4)]))
    loaded = _load([str(path), {"path": str(held), "role": "eval"}], SFT)
    assert (len(loaded["train"]), len(loaded["test"])) == (8, 4)
    assert loaded["train"][1]["messages"][0]["content"] == "Say where Bob lives."


def test_on_bad_rows_takes_error_or_skip():
    with pytest.raises(ConfigError, match="on_bad_rows: 'drop' is not error or skip"):
        DataArguments(datasets=["x.jsonl"], on_bad_rows="drop")
