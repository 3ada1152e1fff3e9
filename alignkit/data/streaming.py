"""Streamed sources (``streaming: true``, the CPT stage): a corpus larger than RAM, read row by row as training goes.

A streamed source is a ``datasets.IterableDataset`` whose rows are read from its files (or a data folder or Hub
dataset, through ``datasets.load_dataset(..., streaming=True)``), renamed, format-converted and schema-checked one
at a time; ``alignkit.data.packing.pack_text_blocks`` then tokenizes and packs them into blocks on the fly. Nothing is
written to the datasets cache and no file is read whole, so memory stays bounded whatever the corpus size.

What that costs, and how alignkit keeps the checks:

- rows are checked as they stream: the first ``streaming_check_rows`` of every shard file before training starts,
  so that common errors still stop the run before step 1; a bad row further on stops it when reached, with its file
  and line (JSON lines, text and CSV files: the file's line; parquet and Hub/folder streams: the data row);
- order: files in name order, each front to back; ``streaming_shuffle_buffer: N`` shuffles the file order and the
  rows within a buffer of N rows (seeded by ``mixture_seed``, reshuffled each epoch); several sources (streamed, or
  loaded whole and weighted as usual) are read one after another, in the recipe's order;
- a stream has no length: ``max_steps`` is required, and ``test_size`` and a streamed source's ``weight`` are
  refused (alignkit.config); a streamed data folder or Hub dataset streams its ``test_split`` too;
- a save_to_disk folder is Arrow on disk already, memory-mapped, and cannot stream; a JSON array file cannot be
  read row by row.
"""

from __future__ import annotations

import codecs
import csv
import logging
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from alignkit.data.files import FILE_BUILDERS, data_suffix, is_glob, open_binary, shard_files
from alignkit.data.formats import FORMATS, RowError, choose, renames
from alignkit.errors import DataError
from alignkit.hub import hub_unreachable

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HubStream:
    """A data folder or Hub dataset streamed by ``datasets.load_dataset`` (one shard: rows count from 1)."""

    path: str
    name: str | None
    split: str
    label: str

    def open(self):
        import datasets

        if not Path(self.path).exists():  # a Hub id: an unreachable Hub turns the process offline (alignkit.hub)
            hub_unreachable()
        try:
            return datasets.load_dataset(self.path, self.name, split=self.split, streaming=True)
        except ValueError as exc:
            if "split" in str(exc).lower():
                raise DataError(
                    self.label, None, f"has no split '{self.split}' to stream ({exc})", "set split:/test_split: to one it has"
                ) from None  # fmt: skip
            raise DataError(
                self.label, None, f"could not be streamed ({exc})", "check the path or dataset id"
            ) from None
        except Exception as exc:  # noqa: BLE001 - a Hub id offline, a folder of unknown files: name it
            raise DataError(
                self.label, None, f"could not be streamed ({type(exc).__name__}: {exc})",
                "check the path, or the dataset id and your network access",
            ) from None  # fmt: skip


@dataclass(frozen=True)
class Plan:
    """How each streamed row becomes a checked row of the stage's columns (picklable: datasets hashes it)."""

    stage: str
    format: str
    renames: tuple[tuple[str, str], ...]  # (their column, the format's)
    roles: tuple[tuple[str, str], ...]
    columns: tuple[str, ...]  # the stage's columns kept
    schema: object | None  # alignkit.data.schemas.Schema


def _shards(source, split: str, label: str) -> list:
    """The files (or the one HubStream) of a streamed source's split."""
    path = Path(source.path)
    if is_glob(source.path):
        files = shard_files(source)
    elif path.is_file():
        files = [str(path)]
    elif path.is_dir() and any(
        (path / name).is_file() for name in ("dataset_dict.json", "dataset_info.json", "state.json")
    ):
        raise DataError(
            source.path, None, "is a save_to_disk folder, which cannot be streamed (it is Arrow on disk already)",
            "set streaming: false: it is memory-mapped, so RAM is not the limit; or stream the data files it was made from",
        )  # fmt: skip
    elif path.is_dir() or not (data_suffix(path) in FILE_BUILDERS or source.path.startswith((".", "/"))):
        return [HubStream(source.path, source.name, split, label)]  # a data folder, or a Hub dataset id
    else:
        raise DataError(source.path, None, "file not found", "check the path (relative paths start from the current directory)")  # fmt: skip
    suffix = data_suffix(files[0])
    if suffix not in FILE_BUILDERS:
        raise DataError(source.path, None, f"unsupported file type '{suffix}'", f"use one of {sorted(FILE_BUILDERS)}")
    if split != source.split:
        raise DataError(source.path, None, f"is read as one split, so it has no '{split}' split", "drop test_split")
    return files


def _lines(path: str):
    """(line number, text) of each line of a UTF-8 file, read a line at a time."""
    with open_binary(path) as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    path, lineno, f"is not UTF-8 text: byte 0x{raw[exc.start]:02x} at column {exc.start + 1}",
                    "save the file as UTF-8 (iconv -f <its encoding> -t utf-8), or fix that byte",
                ) from None  # fmt: skip


def _json_rows(path: str):
    import json

    first = True
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        if first and line.lstrip().startswith("["):
            raise DataError(
                path, None, "is one JSON array, which cannot be read row by row",
                "write it as JSON lines (one object per line, .jsonl), or set streaming: false",
            )  # fmt: skip
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                path, lineno, f"line is not valid JSON ({exc.msg})", "make each line one JSON object"
            ) from None
        if not isinstance(row, dict):
            raise DataError(path, lineno, "line is not a JSON object", 'write each row as {"column": value, ...}')
        first = False
        yield path, lineno, row


def _csv_rows(path: str):
    import io

    with io.TextIOWrapper(open_binary(path), encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None) or []
            end = reader.line_num
            for record in reader:
                if record:  # a blank line is no row, as in datasets' CSV reader
                    yield path, end + 1, dict(zip(header, record))
                end = reader.line_num
        except UnicodeDecodeError as exc:
            raise DataError(path, reader.line_num + 1, f"is not UTF-8 text ({exc.reason})", "save the file as UTF-8") from None  # fmt: skip
        except csv.Error as exc:
            raise DataError(path, reader.line_num, f"is not valid CSV ({exc})", "correct the CSV quoting") from None


def _parquet_rows(path: str):
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        n = 0
        for batch in batches:
            for row in batch.to_pylist():
                n += 1
                yield path, n, row
    except OSError as exc:
        raise DataError(path, None, f"could not be read as parquet ({exc})", "check the file") from None


def read_rows(shard):
    """``(file or label, row number, row)`` of each row of one shard, as it is read."""
    if isinstance(shard, HubStream):
        for n, row in enumerate(shard.open(), start=1):
            yield shard.label, n, row
        return
    suffix = data_suffix(shard)
    if suffix in (".jsonl", ".json"):
        yield from _json_rows(shard)
    elif suffix == ".txt":  # one row per line, as datasets' text reader
        for lineno, line in _lines(shard):
            yield shard, lineno, {"text": line.rstrip("\r\n")}
    elif suffix == ".csv":
        yield from _csv_rows(shard)
    else:
        yield from _parquet_rows(shard)


def prepare(row: dict, where: str, line: int, plan: Plan) -> dict:
    """One read row, renamed, converted by its format and checked, in the stage's columns."""
    if plan.renames:
        mapping = dict(plan.renames)
        row = {mapping.get(k, k): v for k, v in row.items()}
    fmt = FORMATS[plan.format]
    if fmt.convert is not None:
        try:
            row = fmt.convert(row, plan.stage, dict(plan.roles))
        except RowError as exc:
            raise DataError(where, line, f"{fmt.name}: {exc.problem}", exc.fix) from None
    missing = [c for c in plan.columns if c not in row]
    if missing:
        raise DataError(
            where, line, f"has no '{missing[0]}' column (the source's first row has it)",
            f"give every row {list(plan.columns)}, or remove the row",
        )  # fmt: skip
    out = {c: row[c] for c in plan.columns}
    if plan.schema is not None:
        plan.schema.check_row(out, where, line)
    return out


def stream_rows(shards: list, plan: Plan, limit: int | None = None):
    """The prepared rows of ``shards`` in order (the generator of a streamed source; ``limit``: per shard)."""
    for shard in shards:
        for where, line, row in islice(read_rows(shard), limit):
            yield prepare(row, where, line, plan)


def stream_source(source, split: str, schema, data_args, label: str, chosen=None):
    """One split of a streamed source as an IterableDataset of checked rows in the stage's columns; its first rows
    (``streaming_check_rows`` of every shard) are read and checked now. ``chosen``: see
    :func:`alignkit.data.formats.choose`."""
    import datasets

    shards = _shards(source, split, label)
    first = next((row for shard in shards for row in read_rows(shard)), None)  # an empty shard has none
    if first is None:
        raise DataError(label, None, "has no rows (the split is empty)", "add rows, or remove this source")
    where, line, row = first
    mapping = renames(source, list(row), label)
    row = {mapping.get(k, k): v for k, v in row.items()}
    fmt = choose(source, schema.data, label, list(row), row, chosen) if schema is not None else FORMATS["text"]
    if schema is not None:
        try:
            converted = fmt.convert(row, schema.data, dict(source.roles or {})) if fmt.convert else row
        except RowError as exc:
            raise DataError(where, line, f"{fmt.name}: {exc.problem}", exc.fix) from None
        columns = schema.columns_of(list(converted), label)
        extra = sorted(set(converted) - set(columns))
        if extra:
            logger.warning("%s: columns %s are not used by the %s stage and are dropped", label, extra, schema.name)
    else:
        columns = tuple(row)
    plan = Plan(
        stage=schema.data if schema is not None else "cpt",
        format=fmt.name,
        renames=tuple(mapping.items()),
        roles=tuple((source.roles or {}).items()),
        columns=tuple(columns),
        schema=schema,
    )
    for shard in shards:  # common errors stop the run before training: a shard of other columns, a bad first row
        for _ in stream_rows([shard], plan, limit=data_args.streaming_check_rows):
            pass
    features = datasets.Features({"text": datasets.Value("string")}) if plan.columns == ("text",) else None
    logger.info("%s: streamed from %d shard(s), format %s", label, len(shards), fmt.name)
    return datasets.IterableDataset.from_generator(
        stream_rows, features=features, gen_kwargs={"shards": shards, "plan": plan}
    )


def mix_streams(trains: list, tests: list, data_args):
    """The splits of a recipe with a streamed source: every train part (streamed, or loaded whole and weighted) read
    one after another, in the recipe's order, shuffled within ``streaming_shuffle_buffer`` rows if set; the same for
    the test parts."""
    import datasets

    def chain(parts):
        parts = [p if isinstance(p, datasets.IterableDataset) else p.to_iterable_dataset() for p in parts]
        return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]

    train = chain(trains)
    if data_args.streaming_shuffle_buffer:
        train = train.shuffle(seed=data_args.mixture_seed, buffer_size=data_args.streaming_shuffle_buffer)
    if data_args.max_train_samples:
        train = train.take(data_args.max_train_samples)
    out = {"train": train}
    if tests:
        out["test"] = chain(tests).take(data_args.max_eval_samples) if data_args.max_eval_samples else chain(tests)
    return datasets.IterableDatasetDict(out)
