"""The bad-row policy (``on_bad_rows``): a row that fails its format's conversion or the stage's checks stops the run
before training (``error``, the default), or is dropped (``skip``) up to ``max_bad_rows`` per source. Every skipped
row is named (file, row, problem) in the log and in ``alignkit_run.json`` (``data.skipped_rows``), and counted in the
summary. Published data sets carry a few such rows (hh-rlhf: an empty final reply), and a hand edit plus a restart
for each is what this saves; more than the cap means the source is likely the wrong format, and stays an error."""

from __future__ import annotations

import logging
import math

from alignkit.data.places import place
from alignkit.errors import DataError

logger = logging.getLogger(__name__)

LISTED = 20  # skipped rows named one by one in the log and in alignkit_run.json (all are counted)


class Picked:
    """Places (:func:`alignkit.data.places.place`) of the rows ``keep`` of a source whose rows are ``places``."""

    def __init__(self, places, label: str, keep: list[int]):
        self.places, self.label, self.keep = places, label, keep

    def __call__(self, index: int) -> tuple[str, int]:
        return place(self.places, self.label, self.keep[index])


class BadRows:
    """What ``on_bad_rows`` / ``max_bad_rows`` allow, and the rows skipped so far (``rows``: ``(file, row,
    problem)``), over every source of a run."""

    def __init__(self, data_args=None):
        self.skip = getattr(data_args, "on_bad_rows", "error") == "skip"
        self.cap = getattr(data_args, "max_bad_rows", 0)
        self.rows: list[tuple[str, int, str]] = []

    def limit(self, n_rows: int) -> int:
        """The most rows a source of ``n_rows`` may lose: ``max_bad_rows`` as a count (>= 1) or a fraction."""
        return int(self.cap) if self.cap >= 1 else math.floor(self.cap * n_rows)

    def check(self, run, dataset, label: str, places):
        """``run(dataset, places)`` (convert and check one source), dropping each row it refuses until it passes,
        when skipping. Returns what ``run`` returns. Raises the row's DataError when not skipping, a DataError that
        names no row (a column, the file), or one naming the cap when more than :meth:`limit` rows are bad."""
        if not self.skip:
            return run(dataset, places)
        keep, skipped = list(range(len(dataset))), []
        subset, sub_places = dataset, Picked(places, label, keep)
        while True:
            try:
                out = run(subset, sub_places)
                break
            except DataError as exc:
                index = _index_of(exc, sub_places, label, len(subset))
                if index is None:
                    raise
                skipped.append((str(exc.source), exc.row, exc.problem))
                if len(skipped) > self.limit(len(dataset)):
                    listed = "; ".join(f"row {r}: {p}" for _, r, p in skipped[:3])
                    raise DataError(
                        label, None, f"more than max_bad_rows ({self.cap:g}: {self.limit(len(dataset))} of its "
                        f"{len(dataset)} rows) are bad ({listed}; ...): this looks like the wrong format or columns "
                        "rather than a few broken rows",
                        "check the source's format/columns (alignkit data preview), fix the rows, or raise max_bad_rows",
                    ) from None  # fmt: skip
                keep = keep[:index] + keep[index + 1 :]
                subset, sub_places = dataset.select(keep), Picked(places, label, keep)
        for file, row, problem in skipped:
            if len(self.rows) < LISTED:
                logger.warning("on_bad_rows skip: %s row %s skipped: %s", file, row, problem)
            self.rows.append((file, row, problem))
        if skipped:
            logger.warning("on_bad_rows skip: %s: %d of %d rows skipped", label, len(skipped), len(dataset))
        return out

    def report(self) -> dict:
        """For the run record: ``skipped_rows`` (the count) and ``skipped`` (the first :data:`LISTED`: file, row,
        problem); empty when nothing was skipped."""
        if not self.rows:
            return {}
        listed = [{"file": f, "row": r, "problem": p} for f, r, p in self.rows[:LISTED]]
        return {"skipped_rows": len(self.rows), "skipped": listed}


def _index_of(exc: DataError, places, label: str, n_rows: int) -> int | None:
    """The index of the row a DataError names (its file and row), or None when it names no row of this source."""
    if exc.row is None:
        return None
    for i in range(n_rows):
        if place(places, label, i) == (exc.source, exc.row):
            return i
    return None
