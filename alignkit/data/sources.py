"""Dataset sources -> one DatasetDict: local files, save_to_disk folders, Hub ids, weighted mixtures, splits.

Every source is schema-checked on its own before mixing, so an error names the file and the row in it.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import random
import re
from pathlib import Path

from alignkit.config.args import EVAL_SPLITS, DataArguments, DatasetSource
from alignkit.data.bad_rows import BadRows
from alignkit.data.files import (
    FILE_BUILDERS,
    ColumnTypes,
    check_file,
    data_suffix,
    file_rows,
    is_glob,
    read_whole,
    row_lines,
    shard_files,
    special_format,
)
from alignkit.data.formats import convert_source
from alignkit.data.pairing import check_held_out_prompts, held_out_report, held_out_split
from alignkit.data.places import RowPlaces, repeat_each
from alignkit.errors import DataError
from alignkit.hub import hub_unreachable

logger = logging.getLogger(__name__)


def row_places(source: DatasetSource, split: str | None = None):
    """Where each row of a source's split is, for its errors (:func:`alignkit.data.places.place`): the lines of its
    one file, each row's shard file and line for a glob of shards (:class:`RowPlaces`), or None (rows count
    from 1)."""
    files = special_files(source, split)
    if files is not None:
        return RowPlaces(
            [(str(f), len(rows), lines) for f, (rows, lines) in ((f, read_whole(f, source, fmt)) for f, fmt in files)]
        )
    if (split or source.split) != source.split:
        return None
    if not is_glob(source.path):
        path = Path(source.path)
        if path.is_file() and (fmt := special_format(path, source)):
            return read_whole(path, source, fmt)[1]
        return row_lines(path)
    shards = []
    for f in shard_files(source):
        lines = row_lines(Path(f))
        rows = file_rows(Path(f), lines)
        if rows is None:
            return None
        shards.append((f, rows, lines))
    return RowPlaces(shards)


def split_label(source: DatasetSource, split: str) -> str:
    """How errors and logs name one split of a source: its path (the train split), ``path [eval]`` (a held-out
    source), ``path [split]`` (another split)."""
    if source.role == "eval":
        return f"{source.path} [eval]"
    return source.path if split == "train" and source.split == "train" else f"{source.path} [{split}]"


_SPLIT_WORDS = (
    ("test", re.compile(r"test", re.I)),
    ("validation", re.compile(r"(^|[^a-z])(valid|validation|val|dev)([^a-z]|$)", re.I)),
)


def file_split(name: str) -> str:
    """The split a data file's name puts it in, as datasets names a folder's files: ``test`` (a name holding
    'test': test.conll, eng.testa, eng.testb), ``validation`` (valid, val, dev) or ``train`` (any other)."""
    return next((split for split, pattern in _SPLIT_WORDS if pattern.search(name)), "train")


def special_files(source: DatasetSource, split: str | None = None):
    """``[(file, format)]`` of one split of a folder or glob of CoNLL / SQuAD files (datasets would read a .conll
    file as plain text and drop its tags): a glob is one split, a folder's files go to splits by name
    (:func:`file_split`). None when the source is no such folder or glob; [] when the split has no file."""
    import glob

    path = Path(source.path)
    if is_glob(source.path):
        files, by_name = [Path(f) for f in sorted(glob.glob(source.path, recursive=True)) if Path(f).is_file()], False
    elif path.is_dir() and not any(
        (path / n).is_file() for n in ("dataset_dict.json", "dataset_info.json", "state.json")
    ):
        files, by_name = sorted(f for f in path.iterdir() if f.is_file() and not f.name.startswith(".")), True
    else:
        return None
    formats = [special_format(f, source) for f in files] if files else [None]
    if None in formats:
        return None
    split = split or source.split
    if by_name:
        return [(f, fmt) for f, fmt in zip(files, formats) if file_split(f.name) == split]
    return list(zip(files, formats)) if split == source.split else []


def load_source_split(source: DatasetSource, split: str | None = None):
    """Load one split of one source as a ``datasets.Dataset``. Returns None if the split does not exist."""
    import datasets

    split = split or source.split
    path = Path(source.path)
    files = special_files(source, split)
    if files is not None:  # a folder or glob of CoNLL / SQuAD files: read whole, file by file
        rows = [row for f, fmt in files for row in read_whole(f, source, fmt)[0]]
        return datasets.Dataset.from_list(rows) if files else None
    if is_glob(source.path):  # shards: data/train-*.parquet, corpus/**/*.jsonl
        _check_split_label(source)
        return _load_shards(source, split)
    if path.is_file() and (fmt := special_format(path, source)):  # CoNLL / SQuAD files: read whole
        if split != source.split:
            return None
        _check_split_label(source)
        return datasets.Dataset.from_list(read_whole(path, source, fmt)[0])
    if path.is_file():
        builder = FILE_BUILDERS.get(data_suffix(path))
        if builder is None:
            raise DataError(
                str(path), None, f"unsupported file type '{''.join(path.suffixes[-2:]) or path.name}'",
                f"use one of {sorted(FILE_BUILDERS)}, each also compressed (.gz, .bz2, .xz, .zst), or a CoNLL file "
                "(.conll, or format: conll) or SQuAD JSON",
            )  # fmt: skip
        if split != source.split:
            return None  # a single file has one split
        _check_split_label(source)
        check_file(path)
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as exc:
            raise DataError(
                str(path), None, f"could not be read as {builder} ({exc})", "check the file's format"
            ) from exc
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():  # a DatasetDict: load only the split asked for
            try:
                splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
            except (ValueError, KeyError, OSError) as exc:
                raise DataError(
                    f"{path}/dataset_dict.json", None, f"is not a save_to_disk index ({exc})", "save the data again with DatasetDict.save_to_disk"
                ) from None  # fmt: skip
            return _load_saved(path / split, f"{path} [{split}]") if split in splits else None
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
            return _load_saved(path, str(path)) if split == source.split else None
        try:
            loaded = datasets.load_dataset(str(path))
        except Exception as exc:
            raise DataError(
                str(path), None, f"folder could not be loaded ({exc})", "point to data files or a save_to_disk folder"
            ) from exc
        return loaded[split] if split in loaded else None
    if data_suffix(path) in FILE_BUILDERS or source.path.startswith((".", "/")):
        raise DataError(
            source.path, None, "file not found", "check the path (relative paths start from the current directory)"
        )
    unreachable = hub_unreachable()  # an unreachable Hub turns the process offline: a cached dataset loads at once
    try:  # a Hub dataset id
        loaded = datasets.load_dataset(source.path, source.name)
    except Exception as exc:
        why = f"; the Hub cannot be reached: {unreachable}, and it is not in the local cache" if unreachable else ""
        raise DataError(
            source.path,
            None,
            f"not a local file or folder, and loading it from the Hub failed ({type(exc).__name__}{why})",
            "check the path, or the dataset id and your network access",
        ) from exc
    return loaded[split] if split in loaded else None


def _check_split_label(source: DatasetSource) -> None:
    """A file or a glob of shards holds one split: its ``split`` only says whether the rows train (``train``) or are
    held out (EVAL_SPLITS: role eval). Any other name is a DataError with the closest one: a typo such as ``tset``
    would otherwise train on the held-out rows."""
    known = ("train", *EVAL_SPLITS)
    if str(source.split).lower() not in known:
        close = difflib.get_close_matches(str(source.split).lower(), known, n=1, cutoff=0.6)
        raise DataError(
            source.path, None, f"split '{source.split}' is not a split of a file or glob, which holds one: trained, "
            f"or held out when split is one of {', '.join(EVAL_SPLITS)}",
            (f"did you mean split: {close[0]}? " if close else "") + "Write split: test (or role: eval) for held-out "
            "rows, or leave split out to train on them",
        )  # fmt: skip


def _load_shards(source, split: str):
    """A glob of data files of one type, in name order, as one split: every file checked as a single file is."""
    import datasets

    files = shard_files(source)
    if split != source.split:
        return None  # shards make one split
    types = ColumnTypes()
    for f in files:
        check_file(Path(f), types)
    try:
        return datasets.load_dataset(FILE_BUILDERS[data_suffix(files[0])], data_files=files, split="train")
    except Exception as exc:  # noqa: BLE001 - name the pattern and the reader
        raise DataError(
            source.path, None, f"could not be read ({type(exc).__name__}: {exc})", "check the files"
        ) from None


def _load_saved(folder: Path, label: str):
    """One split saved with ``save_to_disk``; an empty one (datasets writes no data file for it, and its loader fails
    with an IndexError) is a DataError naming the split."""
    import datasets

    state = folder / "state.json"
    try:
        if state.is_file() and not json.loads(state.read_text()).get("_data_files"):
            raise DataError(
                label, None, "this split was saved with 0 rows",
                "drop the empty split before save_to_disk, or name another split (split: / test_split:)",
            )  # fmt: skip
        return datasets.load_from_disk(str(folder))
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged folder: name it
        raise DataError(
            label, None, f"could not be loaded from disk ({type(exc).__name__}: {exc})",
            "save it again with save_to_disk, or point to data files",
        ) from None  # fmt: skip


def describe_source(source) -> dict:
    """How a model card names a source, portably: a file by its name with its data rows and sha256, a folder by
    its name, a Hub id as it is (never the local path it was read from)."""
    import hashlib

    path = Path(source.path)
    entry: dict = {"path": source.path, "weight": source.weight, "split": source.split, "name": source.path}
    if source.streaming:
        entry["streaming"] = True
    if source.role == "eval":
        entry["role"] = "eval"
    if is_glob(source.path):  # shards: the pattern, how many files and bytes (hashing a corpus would take minutes)
        import glob

        files = [Path(f) for f in sorted(glob.glob(source.path, recursive=True)) if Path(f).is_file()]
        entry.update(name=f"{path.parent.name}/{path.name}" if path.parent.name else path.name, files=len(files))
        entry["bytes"] = sum(f.stat().st_size for f in files)
    elif path.is_file() and source.streaming:  # a corpus larger than RAM: never read whole to be described
        entry.update(name=path.name, bytes=path.stat().st_size)
    elif path.is_file():
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        lines = row_lines(path)
        entry.update(name=path.name, sha256=digest.hexdigest(), rows=len(lines) if lines is not None else None)
    elif path.is_dir():
        entry["name"] = path.name
    return entry


def mixture_indices(n_rows: int, weight: float, rng: random.Random) -> list[int]:
    """Row indices for one source: weight 0.5 keeps half, 1 keeps all, 2.5 keeps all twice plus half again."""
    target = int(round(weight * n_rows))
    whole, rest = divmod(target, n_rows) if n_rows else (0, 0)
    indices = list(range(n_rows)) * whole + rng.sample(range(n_rows), rest)
    rng.shuffle(indices)
    return indices


def check_source(
    dataset,
    source,
    label: str,
    schema,
    lines=None,
    chosen: list | None = None,
    num_proc=None,
    bad: BadRows | None = None,
):
    """One split of one source in the schema's columns: converted from its published format (the schema's kind of
    data, :mod:`alignkit.data.formats`), then every row checked. ``lines``: where each source row is, for the errors
    (:func:`alignkit.data.places.place`); ``chosen``: see :func:`convert_source`; ``num_proc``: processes for the
    conversion (``dataset_num_proc``); ``bad``: the ``on_bad_rows`` policy (default: the first bad row is the
    DataError)."""

    def run(dataset, lines):
        if schema.data:
            rows = len(dataset)
            dataset = convert_source(dataset, source, schema.data, label, lines, chosen, num_proc=num_proc)
            if lines and schema.data == "kto" and len(dataset) == 2 * rows:  # unpaired: 2 rows per source row
                lines = repeat_each(lines, 2)
        return schema.check(dataset, label, lines, tools=getattr(source, "tools", None))

    return (bad or BadRows()).check(run, dataset, label, lines)


def _still_aligned(places, rows, schema=None):
    """``places`` if it still has one entry per row of ``rows``; KTO's pairs unpaired into two rows each: each
    place twice (rows skipped by on_bad_rows shift them: then None, rows count from 1)."""
    count = places.rows if isinstance(places, RowPlaces) else len(places) if places else None
    if count and getattr(schema, "data", None) == "kto" and len(rows) == 2 * count and "label" in rows.column_names:
        return repeat_each(places, 2)
    return places if count == len(rows) else None


def load_datasets(data_args: DataArguments, schema=None, row_check=None):
    """Load, check, mix and split every source into ``DatasetDict({'train', ['test']})``.

    ``schema`` (from :mod:`alignkit.data.schemas`) checks each source and selects the stage's columns.
    ``row_check(dataset, label, places)``: a further check of each source's loaded split before mixing (the chat
    rows against the run's template, :func:`alignkit.data.chat_rows.check_rows`), so its errors name the file and
    line (``places``: :func:`alignkit.data.places.place`).
    """
    import datasets

    if not data_args.datasets:
        raise DataError("recipe", None, "no datasets given", "add 'datasets: [- path: data/train.jsonl]' to the recipe")
    rng = random.Random(data_args.mixture_seed)
    trains, tests = [], []  # trains: (source, its checked rows, unweighted)
    held = []  # the labels of the eval rows' sources
    bad = BadRows(data_args)
    num_proc = data_args.dataset_num_proc
    for source in data_args.datasets:
        if source.test_split and (Path(source.path).is_file() or is_glob(source.path)):
            what = "is one file" if Path(source.path).is_file() else "is a glob of shards, read as one split"
            raise DataError(
                source.path, None, f"{what}, so it has no '{source.test_split}' split",
                "give the held-out rows as a source of their own with role: eval (- path: test.jsonl, role: eval; "
                "never trained), or use test_size",
            )  # fmt: skip
        label = split_label(source, source.split)
        if source.streaming:  # read row by row as training goes (alignkit.data.streaming)
            from alignkit.data.streaming import stream_source

            stream = stream_source(source, source.split, schema, data_args, label)
            if source.role == "eval":
                tests.append(stream)
                held.append(label)
                continue
            trains.append((source, stream))
            if source.test_split:
                tests.append(
                    stream_source(source, source.test_split, schema, data_args, split_label(source, source.test_split))
                )
                held.append(split_label(source, source.test_split))
            continue
        rows = load_source_split(source)
        if rows is None:
            raise DataError(
                source.path, None, f"has no split '{source.split}'", "set 'split:' on this source to an existing split"
            )
        if len(rows) == 0:
            raise DataError(label, None, "split is empty", "add rows, or remove this source")
        if schema is not None:
            places = row_places(source)
            if isinstance(places, RowPlaces) and places.rows != len(rows):
                places = None  # not the rows datasets read: count them across the shards instead
            rows = check_source(rows, source, label, schema, places, num_proc=num_proc, bad=bad)
        if row_check is not None:
            row_check(rows, label, _still_aligned(places if schema is not None else None, rows, schema))
        if source.role == "eval":  # a held-out file: the eval split, never trained
            tests.append(rows)
            held.append(label)
            continue
        trains.append((source, rows))
        test = load_source_split(source, source.test_split) if source.test_split else None
        if test is not None:
            test_label = split_label(source, source.test_split)
            if schema is not None:
                test_places = row_places(source, source.test_split)
                test = check_source(test, source, test_label, schema, test_places, num_proc=num_proc, bad=bad)
            if row_check is not None:
                row_check(test, test_label, _still_aligned(test_places if schema is not None else None, test, schema))
            tests.append(test)
            held.append(test_label)
    if tests and data_args.test_size:
        logger.warning(
            "test_size %g is not used: the eval split is %s (a held-out source wins over rows drawn from training; "
            "set test_size: 0 to silence this)", data_args.test_size, ", ".join(held),
        )  # fmt: skip
    out = {}
    if tests:
        out["test"] = datasets.concatenate_datasets(tests) if len(tests) > 1 else tests[0]
    elif data_args.test_size:  # held out before the mixture weights, so no upsampled copy of an eval row trains
        tagged = [train.add_column("__alignkit_source", [i] * len(train)) for i, (_, train) in enumerate(trains)]
        pool = datasets.concatenate_datasets(tagged) if len(tagged) > 1 else tagged[0]
        size = int(data_args.test_size) if data_args.test_size >= 1 else data_args.test_size
        if (size if isinstance(size, int) else math.ceil(size * len(pool))) >= len(pool):
            raise DataError(
                "recipe", None, f"test_size {data_args.test_size} leaves no training rows", "lower test_size"
            )
        split = held_out_split(pool, size, data_args.mixture_seed)  # whole prompts (alignkit.data.pairing)
        out["test"] = split["test"].remove_columns("__alignkit_source")
        kept = split["train"]
        if len(trains) == 1:
            trains = [(trains[0][0], kept.remove_columns("__alignkit_source"))]
        else:  # each source's share of the training rows, for its own weight
            trains = [
                (s, kept.filter(lambda tag, i=i: tag == i, input_columns="__alignkit_source").remove_columns("__alignkit_source"))
                for i, (s, _) in enumerate(trains)
            ]  # fmt: skip
    weighted = []
    for source, train in trains:
        if source.weight != 1:
            n_rows = len(train)
            if n_rows == 0:
                raise DataError(source.path, None, "test_size leaves none of its rows for training", "lower test_size")
            if source.weight * n_rows > 1e8:
                raise DataError(
                    source.path,
                    None,
                    f"weight {source.weight:g} asks for {source.weight * n_rows:.3g} rows",
                    "lower the weight",
                )
            train = train.select(mixture_indices(n_rows, source.weight, rng))
            if len(train) == 0:
                raise DataError(
                    source.path, None, f"weight {source.weight:g} keeps 0 of its {n_rows} rows",
                    f"raise the weight to at least {1 / n_rows:.3g}, or remove the source",
                )  # fmt: skip
        weighted.append(train)
    if any(source.streaming for source, _ in trains):  # (test_size is refused with a stream: DataArguments)
        from alignkit.data.streaming import mix_streams

        return mix_streams(weighted, tests, data_args)
    train = datasets.concatenate_datasets(weighted) if len(weighted) > 1 else weighted[0]
    if len(weighted) > 1:
        train = train.shuffle(seed=data_args.mixture_seed)
    out = {"train": train, **out}
    if data_args.max_train_samples:
        out["train"] = out["train"].select(range(min(data_args.max_train_samples, len(out["train"]))))
    if "test" in out and data_args.max_eval_samples:
        out["test"] = out["test"].select(range(min(data_args.max_eval_samples, len(out["test"]))))
    check_held_out_prompts(out["train"], out.get("test"), ", ".join(held) or "the test_size split")
    result = datasets.DatasetDict(out)
    result.alignkit_report = {"held_out": held_out_report(out["train"], out.get("test"), held), **bad.report()}
    return result
