"""Names that mean something off this machine. What alignkit pushes (model card, alignkit_run.json,
alignkit_config.yaml) never carries an absolute local path: a path becomes its last component (a run by its run
name, a data file by its file name), Hub ids and built-in names (``tiny:llama``, ``smollm2:...``) stay as they are.
The files on disk keep their paths: a later stage on this machine reads them."""

from __future__ import annotations

import re
from pathlib import Path

# An absolute POSIX path: a '/' that does not follow a word character, ':', '/' or '.' (so no URL, ratio or
# relative path), then path components.
_ABSOLUTE = re.compile(r"(?<![\w:/.~-])/(?:[\w.+@=-]+/)*[\w.+@=-]+")


def portable_name(value: str | None) -> str | None:
    """An absolute local path -> its last component; anything else (Hub id, tiny:llama, relative path) unchanged."""
    if not value or not value.startswith("/"):
        return value
    return Path(value).name or value


def portable_text(text: str) -> str:
    """``text`` with every absolute path whose first component exists on this machine (``/tmp/...``,
    ``/home/...``, ``/work/...``) replaced by its last component."""

    def replace(match: re.Match) -> str:
        path = match.group(0)
        first = path.split("/")[1]
        return Path(path).name if Path("/" + first).exists() else path

    return _ABSOLUTE.sub(replace, text)


def local_paths(text: str) -> list[str]:
    """The absolute local paths ``text`` still holds (what :func:`portable_text` would replace)."""
    return [m.group(0) for m in _ABSOLUTE.finditer(text) if Path("/" + m.group(0).split("/")[1]).exists()]


def portable_json(value):
    """A JSON value with :func:`portable_text` applied to every string in it (keys kept)."""
    if isinstance(value, str):
        return portable_text(value)
    if isinstance(value, list):
        return [portable_json(v) for v in value]
    if isinstance(value, dict):
        return {k: portable_json(v) for k, v in value.items()}
    return value
