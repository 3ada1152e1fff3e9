"""The published task files, read through the data-format layer: CoNLL column files and SQuAD v1.1/v2 JSON, on
hand-written files; every error names the file and line (or the JSON path) and the fix."""

import json

import pytest

from alignkit.config.args import DataArguments, DatasetSource
from alignkit.data.file_formats import iob1_to_iob2, read_conll, read_squad
from alignkit.data.sources import load_source_split, row_places
from alignkit.errors import ConfigError, DataError

CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP I-ORG
rejects VBZ B-VP O
German JJ B-NP I-MISC
call NN I-NP O
. . O O

Peter NNP B-NP I-PER
Blackburn NNP I-NP I-PER
John NNP B-NP B-PER
"""


def test_conll_rows_lines_columns_and_iob1_to_iob2():
    rows, lines = read_conll(CONLL, "x.conll")
    assert rows == [
        {"tokens": ["EU", "rejects", "German", "call", "."], "ner_tags": ["B-ORG", "O", "B-MISC", "O", "O"]},
        {"tokens": ["Peter", "Blackburn", "John"], "ner_tags": ["B-PER", "I-PER", "B-PER"]},
    ]
    assert lines == [3, 9]  # each sentence's first line; -DOCSTART- and blank lines are no rows
    assert read_conll(CONLL, "x.conll", "pos")[0][1]["ner_tags"] == ["NNP", "NNP", "NNP"]
    assert read_conll(CONLL, "x.conll", 2)[0][0]["ner_tags"] == ["B-NP", "B-VP", "B-NP", "I-NP", "O"]
    assert iob1_to_iob2(["I-PER", "I-PER", "B-PER", "O", "I-LOC", "I-ORG"]) == [
        "B-PER", "I-PER", "B-PER", "O", "B-LOC", "B-ORG",
    ]  # fmt: skip
    iobes = "a S-PER\nb O\nc B-LOC\nd E-LOC\n"
    assert read_conll(iobes, "x")[0][0]["ner_tags"] == ["S-PER", "O", "B-LOC", "E-LOC"]  # kept as it is


@pytest.mark.parametrize(
    "text, tag_column, match",
    [
        ("a NN B-PER\nb NN\n", None, r"x\.conll, row 2: has 2 columns, but line 1 has 3"),
        ("a NN B-PER\nb NN PER\n", None, r"row 2: tag 'PER' has no B-/I- prefix, but 'B-PER' on line 1 has one"),
        (
            "a NN B-PER\n",
            "chunk",
            r"tag_column 'chunk' names no column of this 3-column file .*\['word', 'pos', 'ner'\]",
        ),
        ("a NN B-PER\n", 3, r"tag_column 3 is not a tag column of this 3-column file. Fix: use an index 1..2"),
        ("\n\n", None, "has no sentences"),
    ],
)
def test_conll_errors_name_the_line_and_the_fix(text, tag_column, match):
    with pytest.raises(DataError, match=match):
        read_conll(text, "x.conll", tag_column)


def _squad(qas_extra=None):
    qas = [{"id": "a1", "question": "Who?", "answers": [{"text": "Alice", "answer_start": 0}]}]
    qas += qas_extra or []
    return {"version": "v2.0", "data": [{"title": "t", "paragraphs": [{"context": "Alice went home.", "qas": qas}]}]}


def test_squad_v1_and_v2_rows():
    v2 = _squad([{"id": "u1", "question": "Why?", "answers": [], "is_impossible": True}])
    rows = read_squad(json.dumps(v2, indent=2), "s.json")
    assert rows == [
        {"id": "a1", "title": "t", "question": "Who?", "context": "Alice went home.",
         "answers": {"text": ["Alice"], "answer_start": [0]}},
        {"id": "u1", "title": "t", "question": "Why?", "context": "Alice went home.",
         "answers": {"text": [], "answer_start": []}},
    ]  # fmt: skip


@pytest.mark.parametrize(
    "qa, match",
    [
        ({"id": "b", "question": "What?", "answers": []}, r"data\[0\]\.paragraphs\[0\]\.qas\[1\] \(id 'b'\) has no answers .*is_impossible"),
        ({"id": "c", "answers": []}, r"data\[0\]\.paragraphs\[0\]\.qas\[1\]\.question is missing"),
        ({"id": "d", "question": "Q", "answers": [{"text": "x"}]}, r"qas\[1\]\.answers\[0\]\.answer_start is missing"),
    ],
)  # fmt: skip
def test_squad_errors_name_the_json_path(qa, match):
    with pytest.raises(DataError, match=match):
        read_squad(json.dumps(_squad([qa])), "s.json")


def test_sources_read_conll_and_squad_files_with_their_lines(tmp_path):
    conll = tmp_path / "train.conll"
    conll.write_text(CONLL)
    source = DatasetSource(path=str(conll))
    assert load_source_split(source)["tokens"][1] == ["Peter", "Blackburn", "John"]
    assert row_places(source) == [3, 9]  # schema errors name the sentence's line
    txt = tmp_path / "train.txt"  # any name, with format: conll
    txt.write_text(CONLL)
    assert load_source_split(DatasetSource(path=str(txt), format="conll", tag_column="pos"))["ner_tags"][1][0] == "NNP"
    squad = tmp_path / "dev.json"  # detected from its shape
    squad.write_text(json.dumps(_squad(), indent=2))
    assert load_source_split(DatasetSource(path=str(squad)))["answers"][0] == {"text": ["Alice"], "answer_start": [0]}
    with pytest.raises(ConfigError, match=r"tag_column: only for a CoNLL file"):
        DataArguments(datasets=[{"path": str(squad), "format": "squad", "tag_column": 3}])
