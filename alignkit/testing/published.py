"""Small data files written in the exact layouts public data sets are published in, for tests that read them the way
a user's download is read (no network): CoNLL-2003 English (``-DOCSTART-`` documents, ``word POS chunk NER`` with
IOB1 tags), SQuAD v1.1 JSON, Anthropic hh-rlhf (``*.jsonl.gz`` of ``chosen``/``rejected`` transcripts, with the
faults the published file has: an empty final reply, a reply that repeats the question) and LLaMA-Factory's alpaca
demo (a JSON array). The rows are made up; the layouts are the published ones."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

_PEOPLE = [("Alice", "Paris", "bakery"), ("Bob", "Berlin", "academy"), ("Carol", "Rome", "farm"),
           ("Dan", "Oslo", "school"), ("Eve", "Lima", "cafe"), ("Frank", "Madrid", "shop"),
           ("Grace", "Vienna", "library"), ("Heidi", "Prague", "theatre"), ("Ivan", "Warsaw", "garage"),
           ("Judy", "Dublin", "studio")]  # fmt: skip


def conll2003(names: list[tuple[str, str, str]]) -> str:
    """A CoNLL-2003 English file (eng.train layout): documents opened by ``-DOCSTART- -X- -X- O``, one token per
    line as ``word POS chunk NER``, IOB1 tags, a blank line between sentences. Two sentences per person."""
    out = ["-DOCSTART- -X- -X- O", ""]
    for k, (name, city, place) in enumerate(names):
        if k and k % 3 == 0:
            out += ["-DOCSTART- -X- -X- O", ""]
        out += [f"{name} NNP B-NP I-PER", "lives VBZ B-VP O", "in IN B-PP O", f"{city} NNP B-NP I-LOC", ". . O O", ""]
        out += [f"{name} NNP B-NP I-PER", "works VBZ B-VP O", "at IN B-PP O", "the DT B-NP O",
                f"{place} NN I-NP O", ". . O O", ""]  # fmt: skip
    return "\n".join(out)


def write_conll(folder: Path) -> tuple[Path, Path]:
    """``train.conll`` (6 people, 12 sentences) and ``test.conll`` (4 other people, 8 sentences) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.conll").write_text(conll2003(_PEOPLE[:6]))
    (folder / "test.conll").write_text(conll2003(_PEOPLE[6:]))
    return folder / "train.conll", folder / "test.conll"


def squad11(names: list[tuple[str, str, str]], prefix: str) -> dict:
    """SQuAD v1.1 (``{"version": "1.1", "data": [{"title", "paragraphs": [{"context", "qas": [{"answers": [{
    "answer_start", "text"}], "question", "id"}]}]}]}``): two questions per person, the dev set's three answers
    per question as published (here the same span three times)."""
    paragraphs = []
    for k, (name, city, place) in enumerate(names):
        context = f"{name} lives in {city} and works at the {place} near the river every morning."
        qas = []
        for q, (question, answer) in enumerate(((f"Where does {name} live?", city),
                                                (f"Where does {name} work?", f"the {place}"))):  # fmt: skip
            start = context.index(answer)
            qas.append({"answers": [{"answer_start": start, "text": answer}] * 3, "question": question,
                        "id": f"{prefix}{k}{q}"})  # fmt: skip
        paragraphs.append({"context": context, "qas": qas})
    return {"version": "1.1", "data": [{"title": "People", "paragraphs": paragraphs}]}


def write_squad(folder: Path) -> tuple[Path, Path]:
    """``train-v1.1.json`` (6 people) and ``dev-v1.1.json`` (4 others) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train-v1.1.json").write_text(json.dumps(squad11(_PEOPLE[:6], "t")))
    (folder / "dev-v1.1.json").write_text(json.dumps(squad11(_PEOPLE[6:], "d")))
    return folder / "train-v1.1.json", folder / "dev-v1.1.json"


def hh_records(n: int = 12) -> list[dict]:
    """hh-rlhf harmless-base records as published: ``chosen`` and ``rejected`` are whole transcripts
    ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` sharing all but the final reply. Record 4 (row 4 of the file) has an
    empty final chosen reply (as the published file does); record 7's replies repeat the question first (kept: a
    genuine reply, not a layout fault)."""
    records = []
    for k in range(n):
        name, city, place = _PEOPLE[k % len(_PEOPLE)]
        question = f"Where does {name} live, and what does {name} do there all day?"
        turns = f"\n\nHuman: Hi, I have a question about {name} number {k}.\n\nAssistant: Sure, ask away."
        turns += f"\n\nHuman: {question}"
        good = f"{name} lives in {city} and works at the {place}."
        bad = "I will not tell you that."
        if k == 3:
            good = ""  # the published file has replies like this: "\n\nAssistant:" and nothing after it
        if k == 6:
            good, bad = f"{question} {good}", f"{question} {bad}"
        chosen = f"{turns}\n\nAssistant: {good}" if good else f"{turns}\n\nAssistant:"
        records.append({"chosen": chosen, "rejected": f"{turns}\n\nAssistant: {bad}"})
    return records


def write_hh(path: Path, n: int = 12) -> Path:
    """:func:`hh_records` as ``train.jsonl.gz`` (gzip of JSON lines, the published file's form)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for record in hh_records(n):
            f.write(json.dumps(record) + "\n")
    return path


def alpaca_records(n: int = 8) -> list[dict]:
    """LLaMA-Factory's alpaca demo layout: a JSON array of ``{instruction, input, output}``."""
    return [{"instruction": f"Say where {p[0]} lives.", "input": "" if k % 2 else f"Answer in one sentence ({k}).",
             "output": f"{p[0]} lives in {p[1]}."} for k, p in enumerate((_PEOPLE * 2)[:n])]  # fmt: skip
