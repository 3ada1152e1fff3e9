"""Read an offline W&B run back without the W&B service: the training curve a run logged, from its ``.wandb`` file.

The file is a 7-byte header (``:W&B``, magic 0xBEE1, version 0) followed by a LevelDB-style log: 32 KiB blocks of
records, each with a 7-byte header (crc32 of type byte + payload, payload length, type FULL/FIRST/MIDDLE/LAST); a
block tail shorter than a header is zero padding. Each reassembled payload is one ``wandb_internal_pb2.Record``.

    from alignkit.tracking import read_history
    read_history("wandb/offline-run-...")   # [{'_step': 1, 'train/loss': 6.25, ...}, ...]
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

FILE_HEADER = struct.Struct("<4sHB")  # ident, magic, version
FILE_IDENT, FILE_MAGIC = b":W&B", 0xBEE1
RECORD_HEADER = struct.Struct("<IHB")  # crc32, length, type
BLOCK_SIZE = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class WandbFileError(ValueError):
    """The file is not a W&B run file, or a record is corrupt (names the file and byte offset)."""


def _payloads(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    if len(data) < FILE_HEADER.size or FILE_HEADER.unpack_from(data)[:2] != (FILE_IDENT, FILE_MAGIC):
        raise WandbFileError(f"{path}: not a W&B run file (no ':W&B' header)")
    offset, pending = FILE_HEADER.size, b""
    while offset + RECORD_HEADER.size <= len(data):
        left_in_block = BLOCK_SIZE - offset % BLOCK_SIZE
        if left_in_block < RECORD_HEADER.size:  # zero padding at the end of a block
            offset += left_in_block
            continue
        crc, length, kind = RECORD_HEADER.unpack_from(data, offset)
        if kind == 0 and length == 0:  # preallocated / not yet written tail
            return
        payload = data[offset + RECORD_HEADER.size : offset + RECORD_HEADER.size + length]
        if len(payload) < length:  # the writer was stopped mid-record; everything before it is good
            return
        if zlib.crc32(payload, zlib.crc32(bytes([kind]))) != crc:
            raise WandbFileError(f"{path}: record at byte {offset} fails its checksum")
        offset += RECORD_HEADER.size + length
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        elif kind == LAST:
            yield pending + payload
            pending = b""
        else:
            raise WandbFileError(f"{path}: record at byte {offset} has unknown type {kind}")


def run_file(path: str | Path) -> Path:
    """The ``.wandb`` file of a run: the file itself, a run folder, or a ``WANDB_DIR`` holding exactly one run."""
    path = Path(path)
    if path.is_file():
        return path
    found = sorted(path.glob("*.wandb")) or sorted(path.glob("**/run-*.wandb"))
    if len(found) != 1:
        raise WandbFileError(f"{path}: expected one .wandb run file, found {len(found)}")
    return found[0]


def read_records(path: str | Path):
    """Every ``Record`` of the run, in the order written."""
    from wandb.proto import wandb_internal_pb2

    for payload in _payloads(run_file(path)):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def _item_value(item):
    kind = item.WhichOneof("value")
    if kind is None:  # older writers: JSON text only
        return json.loads(item.value_json) if item.value_json else None
    if kind == "json":
        return json.loads(item.json)
    return None if kind == "none" else getattr(item, kind)


def read_history(path: str | Path) -> list[dict]:
    """The run's history rows (what ``wandb.log`` recorded), one dict per logged step."""
    rows = []
    for record in read_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {"/".join(i.nested_key) if i.nested_key else i.key: _item_value(i) for i in record.history.item}
            )
    return rows


def metric_curve(path: str | Path, key: str = "train/loss") -> list[tuple[int, float]]:
    """``(global_step, value)`` pairs for one metric, e.g. the training loss curve."""
    return [(row.get("train/global_step", row.get("_step")), row[key]) for row in read_history(path) if key in row]


def read_config(path: str | Path) -> dict:
    """The run's config as W&B holds it at the end: every config update applied in order."""
    config: dict = {}
    for record in read_records(path):
        if record.WhichOneof("record_type") == "config":
            for item in record.config.update:
                config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
            for item in record.config.remove:
                config.pop(item.key or "/".join(item.nested_key), None)
    return config
