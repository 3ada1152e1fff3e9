"""Errors alignkit raises for bad input. Each message names where the problem is and how to fix it."""


class AlignkitError(Exception):
    """Base class: a problem with the user's input, found before training starts."""


class ConfigError(AlignkitError, ValueError):
    """A recipe key, value or combination is wrong."""


class DataError(AlignkitError, ValueError):
    """A dataset row, column or file is wrong."""

    def __init__(self, source: str, row: int | None, problem: str, fix: str):
        self.source, self.row, self.problem, self.fix = source, row, problem, fix
        where = f"{source}, row {row}" if row is not None else source
        super().__init__(f"{where}: {problem}. Fix: {fix}")


class PreflightError(AlignkitError, RuntimeError):
    """The run cannot start safely (output dir, disk, tokens, model/adapter mismatch)."""


class NonFiniteLossError(AlignkitError, RuntimeError):
    """Training produced a NaN/Inf loss or gradient norm."""
