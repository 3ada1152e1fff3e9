"""Outputs that are never destroyed: checked before any work, built beside their destination under a name alignkit
owns, and swapped in whole, under a lock per output path.

- :func:`check_output`: an existing file where a folder goes (or a folder where a file goes), a non-empty folder or
  file alignkit did not write, or an output that would overwrite a file of an input folder is refused (ConfigError
  naming the path and the fix) before any model loads.
- :class:`OutputLock`: an exclusive ``flock`` per output path, on ``.<name>.alignkit-lock`` beside it, so a second
  merge or export into the same output is refused naming the holder; the kernel drops it when the holder dies.
- :func:`scratch_dir` / :func:`scratch_file`: unique scratch names (``tempfile.mkdtemp(dir=parent)``), never a
  fixed name a user could own; :func:`swap_in` puts the finished output in place atomically (``renameat2``'s
  ``RENAME_EXCHANGE`` for a folder, ``os.replace`` for a file), so a kill at any moment leaves the old complete output
  or the new complete one under the final name, never a broken one.
- :class:`OutputDirLock`: the training run's lock on its own ``output_dir`` (runs write in place, checkpoint by
  checkpoint, so they lock the folder itself).
- :func:`is_disk_full` / :func:`disk_full_error`: a full disk (ENOSPC, EDQUOT, however the writing library words
  it) while an output is built is one DiskFullError naming the folder and the bytes needed, after the partial output
  is removed; the old output stays.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

from alignkit.errors import ConfigError, DiskFullError, PreflightError, redact

SCRATCH = ".alignkit-"  # scratch names are ".<output name>.alignkit-<random>"
LOCK = ".alignkit-lock"


def _scratch_prefix(out: Path) -> str:
    return f".{out.name}{SCRATCH}"


def check_output(
    out: str | Path,
    kind: str,
    inputs: Iterable[str | Path] = (),
    ours: Callable[[Path], bool] = lambda p: False,
    flag: str = "--output",
    earlier: str = "an earlier output of this command",
) -> Path:
    """Refuse an output path that would destroy something: ``kind`` is ``"folder"`` or ``"file"``; ``ours(out)`` says
    whether what is there is an earlier output of the same command (then it may be replaced). ``inputs``: folders
    the command reads; an output equal to one of them, or a file inside one that is not ``ours``, is refused.
    Returns ``out`` as a Path; raises ConfigError."""
    out = Path(out)
    resolved = out.resolve()
    for folder in inputs:
        folder = Path(folder).resolve()
        if resolved == folder or (kind == "folder" and folder.is_relative_to(resolved)):
            raise ConfigError(f"{flag} {out}: is the input folder {folder} (or holds it); writing there would replace "
                              "the input. Fix: choose an output path outside it.")  # fmt: skip
        if resolved.is_relative_to(folder) and out.exists() and not ours(out):
            raise ConfigError(f"{flag} {out}: is a file of the input folder {folder}; writing there would overwrite "
                              "it. Fix: choose another output path.")  # fmt: skip
    if kind == "folder" and out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {out}: is an existing file, not a folder. Fix: choose a folder path (or move the "
                          "file away).")  # fmt: skip
    if kind == "file" and out.is_dir():
        raise ConfigError(f"{flag} {out}: is a folder. Fix: give a file path, e.g. {out / 'model.gguf'}.")
    if kind == "file" and out.exists() and not ours(out):
        raise ConfigError(f"{flag} {out}: exists and was not written by this command. Fix: choose another path (or "
                          "move the file away).")  # fmt: skip
    if kind == "folder" and out.is_dir() and any(out.iterdir()) and not ours(out):
        raise ConfigError(f"{flag} {out}: exists, is not empty and is not {earlier}. Fix: choose another output "
                          "folder.")  # fmt: skip
    return out


def make_folders(path: str | Path) -> list[Path]:
    """``mkdir -p path``, returning the folders this call created, deepest first ([] when ``path`` existed), for
    :func:`remove_folders` to take back should the command that needed them write nothing. Raises the OSError
    mkdir raises, having removed what it created before failing."""
    path, missing = Path(path), []
    at = path
    while not at.exists() and not at.is_symlink() and at != at.parent:
        missing.append(at)
        at = at.parent
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        remove_folders(missing)
        raise
    return missing


def remove_folders(folders: list[Path]) -> None:
    """Remove folders :func:`make_folders` created (deepest first), each only while it is empty: the first that
    holds anything stops it (its parents hold it). A folder that existed before is never in the list, so a refused
    or previewing command leaves the disk as it found it."""
    for folder in folders:
        try:
            folder.rmdir()
        except FileNotFoundError:
            continue
        except OSError:
            return


class OutputLock:
    """An exclusive lock on one output path for the life of a merge or export: a ``flock`` on
    ``<parent>/.<name>.alignkit-lock`` (removed on release). A second holder is refused with a PreflightError that
    names the holding process. Also removes leftover scratch of killed earlier writers of the same output."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.path = self.out.parent / f".{self.out.name}{LOCK}"
        self.fd: int | None = None
        self.created: list[Path] = []  # the parent folders acquire made: removed on release while empty

    def acquire(self) -> OutputLock:
        import fcntl

        try:
            self.created = make_folders(self.out.parent)
        except OSError as exc:
            raise PreflightError(f"{self.out.parent}: cannot be created ({exc.strerror}). Fix: choose a writable "
                                 "output path.") from None  # fmt: skip
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                remove_folders(self.created)
                raise PreflightError(f"{self.out.parent}: not writable ({exc.strerror}). Fix: choose a writable "
                                     "output path.") from None  # fmt: skip
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = lock_holder(self.path)
                os.close(fd)
                remove_folders(self.created)
                raise PreflightError(
                    f"{self.out}: being written by another alignkit command that is still going ({holder}). Fix: "
                    "wait for it to finish, or choose another output path."
                ) from None
            try:  # the holder before us may have removed the file between our open and our flock: lock the new one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                break
            os.close(fd)
        for leftover in self.out.parent.glob(_scratch_prefix(self.out) + "*"):  # a killed writer's: ours to remove
            if leftover == self.path:
                continue
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        return self

    def release(self) -> None:
        """Drop the lock and its file; remove the parent folders acquire created if nothing was written there."""
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None
        remove_folders(self.created)
        self.created = []

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def scratch_dir(out: Path) -> Path:
    """A new empty folder beside ``out`` (same filesystem, so the swap is a rename), named so no user owns it."""
    path = Path(tempfile.mkdtemp(dir=out.parent, prefix=_scratch_prefix(out)))
    os.chmod(path, 0o777 & ~_umask())  # mkdtemp makes it private; the output gets the permissions mkdir would give
    return path


def scratch_file(out: Path) -> Path:
    """A new empty file beside ``out``, ending like ``out`` (a converter may key on the suffix)."""
    fd, name = tempfile.mkstemp(dir=out.parent, prefix=_scratch_prefix(out), suffix=out.suffix)
    os.close(fd)
    os.chmod(name, 0o666 & ~_umask())
    return Path(name)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_tree(folder: Path) -> None:
    for path in [*sorted(p for p in folder.rglob("*") if p.is_file()), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    return False


def swap_in(scratch: Path, out: Path) -> None:
    """Put the finished ``scratch`` (a folder or a file from this module) at ``out`` in one step and remove what was
    there. Flushed to disk first, so a power loss cannot leave a renamed but empty output."""
    if scratch.is_dir():
        _fsync_tree(scratch)
        if out.is_dir() and _exchange(scratch, out):
            shutil.rmtree(scratch, ignore_errors=True)  # now the old output, under the scratch name
            return
        if out.is_dir():  # no atomic exchange here: move the old one aside first (a kill between leaves it there)
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=_scratch_prefix(out)))
            out.rename(old / "old")
            scratch.rename(out)
            shutil.rmtree(old, ignore_errors=True)
            return
        scratch.rename(out)
        return
    fd = os.open(scratch, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(scratch, out)


class OutputDirLock:
    """An exclusive lock on ``output_dir`` for the life of one run, so a second run into it is refused instead of
    writing over the first. It is a ``flock`` on the directory itself: nothing is written into the folder, and the
    kernel drops the lock when the holding process ends however it ends, so a lock is never stale. Rank 0 takes it
    for all ranks of a launch. ``release`` also removes every folder this run created for it (``output_dir`` and
    any missing parents: ``created``, deepest first) that is still empty, so a run refused before writing anything,
    or a preview, leaves no folder behind; a folder that existed before is never removed."""

    def __init__(self, output_dir: Path):
        self.output_dir = Path(output_dir)
        self.fd: int | None = None
        self.created: list[Path] = []

    def acquire(self) -> None:
        import fcntl

        out = self.output_dir
        try:
            self.created = make_folders(out)
            self.fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            remove_folders(self.created)
            self.created = []
            raise PreflightError(
                f"output_dir {out}: not writable ({exc.strerror}). Fix: choose a writable output_dir."
            ) from exc
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock_holder(out)
            self.release()
            raise PreflightError(
                f"output_dir {out}: in use by another alignkit run that is still going ({holder}). Fix: wait for it "
                "to finish, or choose another output_dir. Do not resume into or overwrite a live run."
            ) from None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # drops the flock
            self.fd = None
        remove_folders(self.created)  # each only if still empty
        self.created = []


def lock_holder(path: Path) -> str:
    """'pid N on host H: <command>' of the process holding the flock on ``path`` (from /proc/locks)."""
    import socket

    try:
        st = os.stat(path)
    except OSError:
        return "another process"
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if "FLOCK" in fields and ident in fields:
                pid = fields[fields.index(ident) - 1]
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                return f"pid {pid} on host {socket.gethostname()}: {redact(cmd)[:160]}"
    except OSError:
        pass
    return "another process"


_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# how libraries word a full disk when they do not raise OSError: safetensors (Rust's io::Error), tokenizers, numpy
_FULL_WORDS = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


def is_disk_full(exc: BaseException, folder: str | Path | None = None) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a full disk: an OSError with ENOSPC/EDQUOT, a
    library's error quoting one, or torch.save's wordless "file write failed" when ``folder``'s disk has under 1 MiB
    free."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _FULL_ERRNOS:
            return True
        if any(word in str(seen) for word in _FULL_WORDS):
            return True
        seen = seen.__cause__ or seen.__context__
    if folder is not None and "write failed" in str(exc):  # torch's PytorchStreamWriter does not say why
        try:
            return shutil.disk_usage(folder).free < 1 << 20
        except OSError:
            return False
    return False


def tree_bytes(path: Path) -> int:
    """Bytes in the files of ``path`` (a file or a folder); 0 if it is gone."""
    try:
        if path.is_file():
            return path.stat().st_size
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    except OSError:
        return 0


def disk_full_error(folder: Path, needed: int, what: str, kept: str, fix: str, at_least: bool = False) -> DiskFullError:
    """The one-line error for a full disk: ``folder`` (where the write failed), ``needed`` bytes (what the write
    needs in all: an estimate, or with ``at_least`` a lower bound), ``what`` was being written, what was ``kept``,
    and the ``fix``."""
    try:
        free = shutil.disk_usage(folder if folder.exists() else folder.parent).free
    except OSError:
        free = 0
    return DiskFullError(
        f"{folder}: the disk is full (no space left while writing {what}): it needs "
        f"{'more than' if at_least else 'about'} {needed:,} bytes, "
        f"{free:,} are free now. {kept} Fix: free at least {max(needed - free, 1):,} bytes on that disk (or choose "
        f"another path), then {fix}."
    )


@contextmanager
def staged_output(out: str | Path, kind: str = "folder"):
    """Lock ``out``, yield a scratch folder (``kind="folder"``) or file beside it to build the output in, and swap
    it in when the block ends without error; on an error (or a kill) the scratch is removed (now, or by the next
    writer of ``out``) and ``out`` is as it was. A full disk meanwhile is a DiskFullError naming ``out`` and the
    bytes needed (more than the scratch held when it filled)."""
    out = Path(out)
    with OutputLock(out):
        scratch = scratch_dir(out) if kind == "folder" else scratch_file(out)
        try:
            yield scratch
        except BaseException as exc:
            written = tree_bytes(scratch)
            if scratch.is_dir():
                shutil.rmtree(scratch, ignore_errors=True)
            else:
                scratch.unlink(missing_ok=True)
            if isinstance(exc, Exception) and is_disk_full(exc, out.parent):
                kept = f"{out} is as it was before." if out.exists() else "Nothing was left behind."
                raise disk_full_error(out, written, f"{out.name}; {written:,} bytes were written before it filled",
                                      kept, "run the same command again", at_least=True) from None  # fmt: skip
            raise
        try:
            swap_in(scratch, out)
        except OSError as exc:  # fsync/rename on a full disk: nothing was swapped
            if not is_disk_full(exc):
                raise
            written = tree_bytes(scratch)
            shutil.rmtree(scratch, ignore_errors=True) if scratch.is_dir() else scratch.unlink(missing_ok=True)
            raise disk_full_error(out, written, out.name, f"{out} is as it was before.", "run the same command again",
                                  at_least=True) from None  # fmt: skip
