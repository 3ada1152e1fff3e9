"""Where a row of a loaded source is, so that every error names what an editor shows: the file it came from and its
line there (JSON lines and CSV; other formats: its data row). One file's rows are a list of lines; a glob of shards
is a :class:`RowPlaces`, one such list per shard file."""

from __future__ import annotations

from bisect import bisect_right


class RowPlaces:
    """The rows of several files read as one source, in order: ``shards`` is ``[(file, rows, lines)]``, ``lines``
    each row's line in that file (or None: rows count from 1)."""

    def __init__(self, shards: list[tuple[str, int, list[int] | None]]):
        self.shards = shards
        self.starts, total = [], 0
        for _, rows, _ in shards:
            self.starts.append(total)
            total += rows
        self.rows = total

    def __call__(self, index: int) -> tuple[str, int]:
        k = max(bisect_right(self.starts, index) - 1, 0)
        file, _, lines = self.shards[k]
        i = index - self.starts[k]
        return file, lines[i] if lines is not None and i < len(lines) else i + 1


def place(places, label: str, index: int) -> tuple[str, int]:
    """``(source, row)`` of the row at ``index``. ``places``: a :class:`RowPlaces`, a list of each row's line in the one
    file ``label``, or None (rows count from 1)."""
    if callable(places):  # RowPlaces, or a subset of a source's rows (alignkit.data.bad_rows.Picked)
        return places(index)
    return label, places[index] if places and index < len(places) else index + 1


def repeat_each(places, n: int):
    """``places`` for a dataset in which every source row became ``n`` consecutive rows (KTO's unpaired pairs)."""
    if isinstance(places, RowPlaces):
        return RowPlaces([(file, rows * n, None if lines is None else [x for x in lines for _ in range(n)])
                          for file, rows, lines in places.shards])  # fmt: skip
    if callable(places):
        return lambda index: places(index // n)
    return [x for x in places for _ in range(n)]
