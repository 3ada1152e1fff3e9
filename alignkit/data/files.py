"""One data file, read as datasets will read it: its text (UTF-8 or a DataError naming the byte), the lines its
rows start on, how many rows it holds, the checks datasets' readers would fail on (JSON syntax, a column changing
type), a CoNLL/SQuAD file read once, and a glob's shard files. alignkit.data.sources and alignkit.data.streaming
build on it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from alignkit.data.file_formats import file_format, looks_squad, read_file_rows
from alignkit.errors import DataError

logger = logging.getLogger(__name__)

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
# Compressed data files as published (hh-rlhf's train.jsonl.gz): read through the standard library's decompressors,
# and by datasets, which extracts them itself. Row numbers name the line of the decompressed text.
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma", ".zst": "zstandard"}


def data_suffix(path) -> str:
    """The data type's suffix of a file, under its compression suffix: ``train.jsonl.gz`` -> ``.jsonl``."""
    path = Path(path)
    return Path(path.stem).suffix if path.suffix in COMPRESSIONS else path.suffix


def compression(path) -> str | None:
    """The decompressor module of a compressed data file (``gzip``, ``bz2``, ``lzma``, ``zstandard``), else None."""
    return COMPRESSIONS.get(Path(path).suffix)


def open_binary(path):
    """A data file opened for reading bytes, decompressed as it is read (DataError when ``.zst`` support, the
    optional ``zstandard`` package, is missing)."""
    import importlib

    module = compression(path)
    if module is None:
        return open(path, "rb")
    try:
        codec = importlib.import_module(module)
    except ImportError:
        raise DataError(
            str(path), None, f"is {Path(path).suffix[1:]}-compressed and the '{module}' package is not installed",
            f"pip install {module}, or decompress it first (unzstd {Path(path).name})",
        ) from None  # fmt: skip
    if module == "zstandard":
        return codec.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
    return codec.open(path, "rb")


def read_text(path: Path) -> str:
    """The file's text (UTF-8; a byte-order mark is dropped), or a DataError naming the file, the line and the byte
    of an encoding error, or the permission problem."""
    try:
        with open_binary(path) as f:
            raw = f.read()
    except PermissionError as exc:
        raise DataError(
            str(path), None, "cannot be read (permission denied)", f"make it readable: chmod a+r {path}"
        ) from exc
    except (OSError, EOFError) as exc:  # a truncated or damaged archive: gzip/bz2/lzma's own errors are OSErrors
        raise DataError(
            str(path), None, f"cannot be read ({getattr(exc, 'strerror', None) or exc})",
            "check the path and the disk" if not compression(path) else "download or compress the file again",
        ) from exc  # fmt: skip
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(
            str(path), line, f"is not UTF-8 text: byte 0x{raw[exc.start]:02x} at column {column} (file offset {exc.start})",
            "save the file as UTF-8 (iconv -f <its encoding> -t utf-8), or fix that byte",
        ) from None  # fmt: skip


def special_format(path: Path, source) -> str | None:
    """``conll`` / ``squad`` for a file of those formats (named, or by suffix; a .json holding SQuAD's object)."""
    fmt = file_format(path, source)
    if fmt is None and source.format is None and data_suffix(path) == ".json" and looks_squad(read_text(path)):
        fmt = "squad"
    return fmt


_READ: dict = {}


def read_whole(path: Path, source, fmt: str) -> tuple[list[dict], list[int] | None]:
    """A CoNLL / SQuAD file's rows and lines, read once per file version (the rows and their places both use it)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size, fmt, source.tag_column)
    if key not in _READ:
        _READ.clear()
        _READ[key] = read_file_rows(read_text(path), str(path), fmt, source)
    return _READ[key]


def row_lines(path: Path) -> list[int] | None:
    """The file line each row starts on, for JSON-lines and CSV files (blank lines skipped, a CSV header is line 1,
    a quoted CSV field may span lines), or None for other sources."""
    if not path.is_file():
        return None
    if data_suffix(path) == ".csv":
        import csv
        import io

        reader = csv.reader(io.StringIO(read_text(path)))
        next(reader, None)  # the header
        lines, end = [], reader.line_num
        for record in reader:
            if record:  # a blank line: no row (datasets' CSV reader skips it too)
                lines.append(end + 1)
            end = reader.line_num
        return lines
    if data_suffix(path) not in (".jsonl", ".json") or read_text(path).lstrip().startswith("["):
        return None
    return [n for n, line in enumerate(read_text(path).splitlines(), start=1) if line.strip()]


def _kind(value) -> str | None:
    """A JSON value's type, as a message names it (None: null, which goes with any type)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    return "text" if isinstance(value, str) else "a list" if isinstance(value, list) else "an object"


class ColumnTypes:
    """The JSON type of every column, and of every field nested in one (``messages[].content``), on the first row
    that sets it, over one file or all the shards of a glob. datasets' JSON reader cannot hold two types in one
    column: on a later row it fails with a pyarrow error, or turns the values into others without a word (in a
    file's first 10 MB the text "4" becomes the number 4; later, or in a later shard, a list becomes the text
    '["x"]'). So a row whose type differs is a DataError naming its file and line, and the first row's."""

    def __init__(self):
        self.seen: dict[str, tuple[str, str, int]] = {}

    def check(self, row: dict, path: Path, line: int, unit: str = "line") -> None:
        """``line``: the row's line in ``path`` (``unit`` 'row': its data row, for a JSON array)."""
        from collections import deque

        queue = deque(row.items())  # in the row's order, so that the first value of a field sets its type
        while queue:
            name, value = queue.popleft()
            kind = _kind(value)
            if kind is None:
                continue
            first, first_file, first_line = self.seen.setdefault(name, (kind, str(path), line))
            if first != kind:
                where = f"{unit} {first_line}" + ("" if first_file == str(path) else f" of {first_file}")
                quote = (
                    ' (a number meant as text is quoted: "4", not 4)' if {kind, first} == {"text", "a number"} else ""
                )
                drop = "" if "." in name or "[" in name else ", or drop the column from the file"
                raise DataError(
                    str(path), line, f"'{name}' is {kind} ({value!r:.40}) here but {first} on {where}: a column holds "
                    "one type in every row (datasets' reader fails on a second type, or silently changes such values)",
                    f"write '{name}' as {first} in every row{quote}{drop}",
                )  # fmt: skip
            if kind == "a list":
                queue.extend((f"{name}[]", item) for item in value)
            elif kind == "an object":
                queue.extend((f"{name}.{key}", item) for key, item in value.items())


def _check_json_array(path: Path, text: str, types: ColumnTypes) -> None:
    """A .json file holding one array of row objects: valid JSON, and one type per column (rows count from 1)."""
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(str(path), exc.lineno, f"is not valid JSON ({exc.msg})", "correct the JSON array") from None
    if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
        for i, row in enumerate(rows, start=1):
            types.check(row, path, i, unit="row")


def _check_jsonl(path: Path, types: ColumnTypes) -> None:
    """datasets' JSON reader fails with a pyarrow trace (or changes values silently, see :class:`ColumnTypes`);
    find the bad line ourselves first. Rows are numbered by their line in the file, here and in every schema error
    (blank lines count)."""
    rows = 0
    for lineno, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                str(path), lineno, f"line is not valid JSON ({exc.msg})", "make each line one JSON object"
            ) from exc
        if not isinstance(value, dict):
            raise DataError(str(path), lineno, "line is not a JSON object", 'write each row as {"column": value, ...}')
        types.check(value, path, lineno)
        rows += 1
    if not rows:
        raise DataError(str(path), None, "file has no rows (the split is empty)", "add rows, or remove this source")


def check_file(path: Path, types: ColumnTypes | None = None) -> None:
    """What datasets' reader would fail on or change, found first with the file and line: encoding, JSON syntax, a
    column's type changing between rows (``types``: shared by the shards of a glob, which datasets reads as one)."""
    suffix = data_suffix(path)
    text = read_text(path) if suffix in (".jsonl", ".json", ".csv", ".txt") else None
    types = types or ColumnTypes()
    if suffix == ".json" and text.lstrip().startswith("["):
        _check_json_array(path, text, types)
    elif suffix in (".jsonl", ".json"):
        _check_jsonl(path, types)


def is_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def shard_files(source) -> list[str]:
    """The files a glob source matches, in name order: one type of data file, or a DataError naming the pattern."""
    import glob

    files = sorted(glob.glob(source.path, recursive=True))
    if not files:
        raise DataError(source.path, None, "matches no file", "check the pattern (relative to the current directory)")
    suffixes = sorted({data_suffix(f) for f in files})
    if len(suffixes) != 1 or suffixes[0] not in FILE_BUILDERS:
        raise DataError(
            source.path,
            None,
            f"matches files of types {suffixes}",
            f"match files of one type of {sorted(FILE_BUILDERS)}",
        )
    return files


def file_rows(path: Path, lines: list[int] | None) -> int | None:
    """How many rows datasets reads from one data file, or None when that is not known cheaply."""
    if lines is not None:
        return len(lines)
    if data_suffix(path) == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(str(path)).metadata.num_rows
    if data_suffix(path) == ".txt":
        return len(read_text(path).splitlines())  # datasets' text reader: one row per line
    if data_suffix(path) == ".json":
        rows = json.loads(read_text(path))
        return len(rows) if isinstance(rows, list) else None
    return None
