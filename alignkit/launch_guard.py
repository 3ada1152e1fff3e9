"""One clean error under a launcher: ``accelerate launch``, ``torchrun`` and ``python -m`` either of them.

A recipe that meets bad input prints one message naming the key, file or row and the fix (rank 0 only) and exits 2
(:func:`alignkit.errors.run_cli`). The launcher then reports the child's failure its own way, and that report is
what the user would see last: accelerate's single-process launcher raises ``subprocess.CalledProcessError``, whose
traceback prints the whole command line, a ``--hub_token`` with it; torch elastic (accelerate's multi-process and
DeepSpeed launchers, torchrun) raises ``ChildFailedError`` with a table of failed ranks, and logs each failure.

``alignkit-launch.pth`` (installed into site-packages with alignkit; one line, run at every interpreter start)
calls :func:`install` only in a launcher process. :func:`install` sets an excepthook for those two errors and a log
filter for torch elastic's per-rank failure lines:

- the child exited 2 (bad input, its message already printed): nothing more is printed; the launcher exits 2;
- another failure (a crash, a NaN stop): one line saying which rank failed with which exit code, above it the
  child's own error; the launcher exits with that code (1 when the child died of a signal). The command line is
  never printed; with ``ALIGNKIT_TRACEBACK=1`` the launcher's traceback is printed, every secret redacted.

accelerate's DeepSpeed launcher without DeepSpeed installed (an ImportError that ends in a bare ``pip3 install
deepspeed``, which would build against another torch) becomes one line with the install command; exit 2.

It also forwards SIGTERM and SIGINT to the launcher's children (accelerate's one-process launcher otherwise dies
of them and leaves the training process running as an orphan): the run saves a checkpoint, marks itself
``interrupted`` and exits 128 + the signal's number, which the launcher then exits with. torch elastic's agent
(multi-process launches) replaces these handlers with its own: it signals the workers likewise, waits for them (up
to torch's shutdown timeout, 30 s, before it kills them) and raises ``SignalException``, which exits 128 + the
signal with no traceback (the ranks said what happened).
"""

from __future__ import annotations

import logging
import os
import sys

BAD_INPUT = 2  # alignkit.errors.run_cli's exit code for an AlignkitError
INTERRUPTED = (128 + 2, 128 + 15)  # alignkit.errors.RunInterrupted: SIGINT, SIGTERM (the child said so)
LAUNCHER_SCRIPTS = {"accelerate": "launch", "accelerate-launch": None, "torchrun": None}
LAUNCHER_MODULES = ("accelerate.commands.launch", "torch.distributed.run", "torch.distributed.launch")
ELASTIC_LOGGER = "torch.distributed.elastic.multiprocessing.api"


def is_launcher(orig_argv: list[str]) -> bool:
    """Whether ``orig_argv`` (``sys.orig_argv``: the interpreter's own command line) starts a launcher."""
    args = orig_argv[1:]
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "-c":
            return False
        if arg == "-m":
            return i + 1 < len(args) and args[i + 1] in LAUNCHER_MODULES
        if arg in ("-W", "-X"):  # interpreter options that take a value
            i += 2
            continue
        if not arg.startswith("-"):  # the script
            name = os.path.basename(arg)
            if name not in LAUNCHER_SCRIPTS:
                return False
            sub = LAUNCHER_SCRIPTS[name]
            return sub is None or (i + 1 < len(args) and args[i + 1] == sub)
        i += 1
    return False


def install(orig_argv: list[str] | None = None) -> bool:
    """Install the excepthook and log filter if this process is a launcher; returns whether it did."""
    if not is_launcher(list(orig_argv if orig_argv is not None else getattr(sys, "orig_argv", sys.argv))):
        return False
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        code = child_exit_code(exc)
        if code is None and isinstance(exc, ImportError) and "DeepSpeed is not installed" in str(exc):
            from alignkit.errors import deepspeed_missing  # accelerate's DeepSpeed launcher, before any child starts

            print(f"alignkit: {deepspeed_missing('this accelerate config')}", file=sys.stderr)
            code = BAD_INPUT
        elif code is None:
            return previous(exc_type, exc, tb)
        _report(exc_type, exc, tb, code)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(code if code > 0 else 1)  # a signal's negative code: 1, as the launcher itself exits

    sys.excepthook = hook
    logging.getLogger(ELASTIC_LOGGER).addFilter(_quiet_bad_input)
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _forward)
    import atexit
    import gc

    atexit.register(gc.freeze)  # the launcher's exit skips the final collections over torch's objects (errors.py)
    return True


def _children() -> list[int]:
    """Pids of this process's children (from /proc)."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == me:
                found.append(int(entry))
    return found


def _forward(signum, frame) -> None:
    """Pass the signal on to the training children and keep waiting for them: they save and exit."""
    for pid in _children():
        try:
            os.kill(pid, signum)
        except OSError:
            pass


def child_exit_code(exc: BaseException) -> int | None:
    """The exit code of the failed child a launcher error reports (the root cause's, for torch elastic), or None
    for any other error."""
    import subprocess

    if isinstance(exc, subprocess.CalledProcessError):
        return exc.returncode
    if type(exc).__name__ == "ChildFailedError" and hasattr(exc, "get_first_failure"):
        _, failure = exc.get_first_failure()
        return failure.exitcode
    if type(exc).__name__ == "SignalException" and int(getattr(exc, "sigval", 0)) in (2, 15):
        # torch elastic's agent got SIGTERM/SIGINT: it sent it on to the ranks and waited while they saved a
        # checkpoint and exited 128 + the signal (their message printed), then raised this: exit as they did
        return 128 + int(exc.sigval)
    return None


def _report(exc_type, exc, tb, code: int) -> None:
    from alignkit.errors import redact

    if os.environ.get("ALIGNKIT_TRACEBACK") == "1":
        import traceback

        sys.stderr.write(redact("".join(traceback.format_exception(exc_type, exc, tb))))
    if code == BAD_INPUT or code in INTERRUPTED:
        return  # the child printed the message and the fix
    rank = ""
    if type(exc).__name__ == "ChildFailedError":
        rank_id, _ = exc.get_first_failure()
        rank = f" on rank {rank_id}"
    what = f"signal {-code}" if code < 0 else f"exit code {code}"
    print(
        f"alignkit: the training script failed{rank} ({what}); its own error is printed above. "
        "ALIGNKIT_TRACEBACK=1 shows the launcher's traceback.",
        file=sys.stderr,
        flush=True,
    )


def _quiet_bad_input(record: logging.LogRecord) -> bool:
    """Drop torch elastic's per-rank lines ('failed (exitcode: 2) ... of binary: ...' and 'Sending process N
    closing signal SIGTERM' to the ranks still running): the failed rank printed its own error, and for any other
    failure the excepthook's line names the rank and the exit code."""
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a filter must never raise
        return True
    return f"(exitcode: {BAD_INPUT})" not in message and "closing signal" not in message
