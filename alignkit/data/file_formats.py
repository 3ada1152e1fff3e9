"""Data files no row reader understands, read into a task's canonical rows: CoNLL column files (token
classification) and SQuAD's nested JSON (extractive QA). ``format: conll`` / ``format: squad`` (or a
.conll/.iob/.bio file, or a .json file holding a top-level {"data": [{"paragraphs": ...}]}) reads such a file.
The row formats (alpaca, sharegpt, hh, ...) are alignkit.data.formats."""

from __future__ import annotations

import json
import logging
import re

from alignkit.errors import DataError

logger = logging.getLogger(__name__)

CONLL_SUFFIXES = (".conll", ".iob", ".bio", ".conll03")
# Column names by column count, CoNLL-2003's layout first ("word POS chunk NER"); the last column is the default tag.
CONLL_COLUMNS = {2: ("word", "ner"), 3: ("word", "pos", "ner"), 4: ("word", "pos", "chunk", "ner")}
_TAG = re.compile(r"^([BIES])-(.+)$")


def _conll_column(tag_column, n_columns: int, path: str) -> int:
    """The 0-based index of the tag column: ``None`` (the last), an index (1.. for the columns after the word) or a
    name of :data:`CONLL_COLUMNS` (``ner``, ``pos``, ``chunk``)."""
    names = CONLL_COLUMNS.get(n_columns, ())
    if tag_column is None:
        return n_columns - 1
    if isinstance(tag_column, int) or (isinstance(tag_column, str) and tag_column.isdigit()):
        index = int(tag_column)
        if 1 <= index < n_columns:
            return index
        raise DataError(
            path, None, f"tag_column {tag_column} is not a tag column of this {n_columns}-column file",
            f"use an index 1..{n_columns - 1} (0 is the word)" + (f", or a name of {list(names[1:])}" if names else ""),
        )  # fmt: skip
    lowered = str(tag_column).lower()
    if lowered in names[1:]:
        return names.index(lowered)
    raise DataError(
        path, None, f"tag_column {tag_column!r} names no column of this {n_columns}-column file"
        + (f" (its columns: {list(names)})" if names else " (names are known for 2, 3 and 4 columns)"),
        f"use one of {list(names[1:])} or an index 1..{n_columns - 1}" if names else f"use an index 1..{n_columns - 1}",
    )  # fmt: skip


def iob1_to_iob2(tags: list[str]) -> list[str]:
    """IOB1 (``I-`` opens an entity unless it continues one of the same type; CoNLL-2003 as published) to IOB2
    (every entity opens with ``B-``), the scheme seqeval's default and transformers' token-classification pipeline
    read. IOB2 tags pass unchanged."""
    out, previous = [], "O"
    for tag in tags:
        m = _TAG.match(tag)
        if m and m.group(1) == "I":
            p = _TAG.match(previous)
            if not p or p.group(2) != m.group(2):
                tag = "B-" + m.group(2)
        out.append(tag)
        previous = tag
    return out


def check_tag_scheme(sentences: list[list[str]], lines: list[list[int]], path: str) -> str:
    """The scheme of a file's tags: ``iob1``, ``iob2``, ``iobes`` (E-/S- tags) or ``plain`` (POS tags, no
    prefixes). A file mixing prefixed entity tags with unprefixed ones (other than ``O``) is a DataError naming the
    line."""
    prefixed, plain = None, None
    scheme = "iob2"
    for tags, where in zip(sentences, lines):
        previous = "O"
        for tag, line in zip(tags, where):
            m = _TAG.match(tag)
            if m:
                prefixed = prefixed or (tag, line)
                if m.group(1) in "ES":
                    scheme = "iobes"
                elif m.group(1) == "I" and scheme == "iob2":
                    p = _TAG.match(previous)
                    if not p or p.group(2) != m.group(2):
                        scheme = "iob1"
            elif tag != "O":
                plain = plain or (tag, line)
            previous = tag
    if prefixed and plain:
        raise DataError(
            path, plain[1], f"tag {plain[0]!r} has no B-/I- prefix, but {prefixed[0]!r} on line {prefixed[1]} has one: "
            "one column holds one tag scheme", "prefix entity tags (B-X, I-X; O outside), or choose another tag_column",
        )  # fmt: skip
    return scheme if prefixed else "plain"


class SentenceLine(int):
    """The line of a CoNLL sentence's first word, as a row's place (alignkit.data.places): the sentence's words are
    on consecutive lines (a blank or ``-DOCSTART-`` line ends it), so word ``j`` is on :meth:`word_line` ``(j)``,
    and an error about one word's tag names that word's line."""

    def word_line(self, j: int) -> int:
        return int(self) + j


def word_line(row, j: int):
    """The line of word ``j`` of a row placed at ``row``: a CoNLL sentence's (:class:`SentenceLine`), else ``row``
    (a JSON line holds the whole word list)."""
    return row.word_line(j) if isinstance(row, SentenceLine) else row


def read_conll(text: str, path: str, tag_column=None) -> tuple[list[dict], list[int]]:
    """A CoNLL column file (one token per line, ``word [POS chunk] TAG`` separated by spaces or tabs, a blank line
    between sentences, ``-DOCSTART-`` lines skipped) -> rows ``{tokens, ner_tags}`` and each row's first line.

    ``tag_column`` chooses the tag column (see :func:`_conll_column`; default the last). IOB1 tags are converted to
    IOB2 (logged); IOBES and plain tags are kept. Raises DataError naming the line for a row with another number of
    columns, or for mixed tag schemes."""
    sentences: list[list[list[str]]] = []
    lines: list[list[int]] = []
    n_columns = None
    current, where = [], []
    for number, line in enumerate(text.splitlines() + [""], start=1):
        fields = line.split()
        if not fields or fields[0] == "-DOCSTART-":
            if current:
                sentences.append(current)
                lines.append(where)
            current, where = [], []
            continue
        if n_columns is None:
            n_columns = len(fields)
            if n_columns < 2:
                raise DataError(
                    path, number, "has one column; a CoNLL file has the word, then its tag(s)",
                    "write 'word TAG' per line (spaces or tabs), a blank line between sentences",
                )  # fmt: skip
        elif len(fields) != n_columns:
            raise DataError(
                path, number, f"has {len(fields)} columns, but line {lines[0][0] if lines else where[0]} has "
                f"{n_columns}", "give every token line the same columns (a word holds no spaces)",
            )  # fmt: skip
        current.append(fields)
        where.append(number)
    if not sentences:
        raise DataError(path, None, "has no sentences", "write one token per line, a blank line between sentences")
    column = _conll_column(tag_column, n_columns, path)
    tags = [[f[column] for f in s] for s in sentences]
    scheme = check_tag_scheme(tags, lines, path)
    if scheme == "iob1":
        tags = [iob1_to_iob2(t) for t in tags]
        logger.info("%s: IOB1 tags (I- opening entities) converted to IOB2 (B- opens every entity)", path)
    rows = [{"tokens": [f[0] for f in s], "ner_tags": t} for s, t in zip(sentences, tags)]
    return rows, [SentenceLine(w[0]) for w in lines]


def looks_squad(text: str) -> bool:
    """A SQuAD file: one JSON object whose ``data`` is a list of articles with ``paragraphs``."""

    if not text.lstrip().startswith("{"):
        return False
    try:
        data = json.loads(text)
    except ValueError:
        return False
    articles = data.get("data") if isinstance(data, dict) else None
    return (
        isinstance(articles, list) and bool(articles) and isinstance(articles[0], dict) and "paragraphs" in articles[0]
    )


def read_squad(text: str, path: str) -> list[dict]:
    """SQuAD v1.1 / v2.0 JSON (``{"data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question",
    "answers": [{"text", "answer_start"}], "is_impossible"}]}]}]}``) -> one row per question, ``{id, title,
    question, context, answers: {text: [...], answer_start: [...]}}`` (the Hub's ``squad`` / ``squad_v2`` columns).
    A v2 unanswerable question (``is_impossible: true``) gets empty answers. DataError names the JSON path
    (``data[i].paragraphs[j].qas[k]``) of a malformed entry."""

    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(path, exc.lineno, f"is not valid JSON ({exc.msg})", "correct the JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise DataError(
            path, None, "has no top-level 'data' list of articles", 'write {"data": [{"paragraphs": [...]}]}'
        )

    def need(obj, key, kind, where):
        value = obj.get(key) if isinstance(obj, dict) else None
        if not isinstance(value, kind):
            what = {list: "a list", str: "text", dict: "an object"}.get(kind, kind.__name__)
            raise DataError(path, None, f"{where}.{key} is missing or not {what}", f"give every entry its '{key}'")
        return value

    rows = []
    for i, article in enumerate(data["data"]):
        for j, paragraph in enumerate(need(article, "paragraphs", list, f"data[{i}]")):
            here = f"data[{i}].paragraphs[{j}]"
            context = need(paragraph, "context", str, here)
            for k, qa in enumerate(need(paragraph, "qas", list, here)):
                where = f"{here}.qas[{k}]"
                question = need(qa, "question", str, where)
                impossible = bool(qa.get("is_impossible", False))
                answers = [] if impossible else need(qa, "answers", list, where)
                if not impossible and not answers:
                    raise DataError(
                        path, None, f"{where} (id {qa.get('id')!r}) has no answers and is not marked is_impossible",
                        "add its answers, or mark it 'is_impossible': true (SQuAD v2) to train the null answer",
                    )  # fmt: skip
                for a, answer in enumerate(answers):
                    need(answer, "text", str, f"{where}.answers[{a}]")
                    if not isinstance(answer.get("answer_start"), int):
                        raise DataError(
                            path, None, f"{where}.answers[{a}].answer_start is missing or not a character offset",
                            "give each answer its start offset in the context",
                        )  # fmt: skip
                rows.append(
                    {
                        "id": str(qa.get("id", f"{i}-{j}-{k}")),
                        "title": str(article.get("title", "")),
                        "question": question,
                        "context": context,
                        "answers": {
                            "text": [a["text"] for a in answers],
                            "answer_start": [a["answer_start"] for a in answers],
                        },
                    }
                )
    if not rows:
        raise DataError(path, None, "has no questions", "add qas to the paragraphs")
    return rows


def file_format(path, source) -> str | None:
    """``conll`` or ``squad`` when the source names it or the file is one (suffix; a SQuAD-shaped .json), else None:
    the file is read by datasets."""
    if source.format in ("conll", "squad"):
        return source.format
    from alignkit.data.files import data_suffix  # (files imports this module: the suffix helper is imported late)

    if source.format is None and data_suffix(path) in CONLL_SUFFIXES:
        return "conll"
    return None


def read_file_rows(text: str, path: str, fmt: str, source) -> tuple[list[dict], list[int] | None]:
    """The rows of a ``conll`` / ``squad`` file and each row's line (None for SQuAD: rows count from 1)."""
    if fmt == "conll":
        return read_conll(text, path, source.tag_column)
    return read_squad(text, path), None
