"""Errors alignkit raises for bad input. Each message names where the problem is and how to fix it."""

import re

# Secrets by value (Hugging Face tokens, 40-hex W&B API keys) and by the flag or variable that carries them.
_SECRET_VALUE = re.compile(r"\b(hf_[A-Za-z0-9]{8,}|[0-9a-f]{40})\b")
_SECRET_KEYS = r"(?:hub_token|hf_token|token|api_key|wandb_api_key|password|secret)"
_SECRET_NAMED = (
    re.compile(  # `--hub_token VALUE`, `--token=VALUE`, `hub_token: VALUE`, `HF_TOKEN=VALUE`, `"token": "VALUE"`
        rf"((?<![A-Za-z0-9_])(?:--{_SECRET_KEYS}(?:\s+|=)|{_SECRET_KEYS}['\"]?\s*[=:]\s*['\"]?))([^\s'\",]+)",
        re.IGNORECASE,
    )
)


def redact(text: str) -> str:
    """``text`` with every secret replaced by ``<redacted>``: by value pattern and after a secret's key name."""
    text = _SECRET_NAMED.sub(lambda m: m.group(1) + "<redacted>", text)
    return _SECRET_VALUE.sub("<redacted>", text)


# How to install DeepSpeed (the ZeRO accelerate configs, a recipe's `deepspeed:` key): it builds against the installed
# torch, so after it and without build isolation (pip's isolated build would fetch another torch); DS_BUILD_OPS=0
# leaves its kernels to first use. scripts/install.sh runs it; pyproject.toml's deepspeed extra holds the same range.
DEEPSPEED_INSTALL = 'DS_BUILD_OPS=0 pip install --no-build-isolation "deepspeed>=0.19.8,<0.20"'


def deepspeed_missing(what: str) -> str | None:
    """The one-line error for ``what`` (a launch config, a key) that needs DeepSpeed when it is not installed, else
    None."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        return None
    return (
        f"{what} needs DeepSpeed, which is not installed. Fix: install it after torch: {DEEPSPEED_INSTALL} "
        "(scripts/install.sh does), or train without DeepSpeed (--accelerate_config ddp, or no deepspeed key)."
    )


def suggest(key: str, valid) -> str:
    """' Did you mean 'x'?' for the closest of ``valid`` to a mistyped ``key``, or ''."""
    import difflib

    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


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

    def __reduce__(self):  # rebuilt from its parts when it crosses processes (datasets.map with num_proc)
        return type(self), (self.source, self.row, self.problem, self.fix)


class PreflightError(AlignkitError, RuntimeError):
    """The run cannot start safely (output dir, disk, tokens, model/adapter mismatch)."""


class NonFiniteLossError(AlignkitError, RuntimeError):
    """Training produced a NaN/Inf loss or gradient norm (``status``: what the run record says)."""

    status = "non-finite loss"


class DivergenceError(NonFiniteLossError):
    """Training diverged without a NaN: a gradient norm stuck at 0, or a loss that jumped."""

    status = "diverged"


class MergeParityError(AlignkitError, RuntimeError):
    """A merged model failed its parity gate (exit 1): its logits differ from base + adapter by more than the bound,
    so it is not the model that was trained. The merged folder is kept for inspection; its record and card say so."""

    exit_code = 1


class RewardFunctionError(AlignkitError, RuntimeError):
    """A GRPO reward function failed during training (raised, or broke the reward contract)."""

    status = "reward function failed"


class DiskFullError(AlignkitError, RuntimeError):
    """The disk filled up while alignkit wrote an output or a checkpoint (exit 2): the message names the folder and
    the bytes needed; what was complete before is kept (the partial output was removed)."""

    status = "disk full"


class RunInterrupted(AlignkitError, RuntimeError):
    """The run got SIGTERM/SIGINT; it saved a checkpoint and stopped (exit 128 + the signal's number)."""

    status = "interrupted"

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


RANK_WAITS_FOR_RANK_0 = 5.0  # seconds a rank other than 0 waits before it exits on bad input (run_cli)


def skip_final_collections() -> None:
    """For a process's own entry point (a recipe run as a script, ``alignkit``, a launcher): keep the garbage collector
    off what is alive now and at exit. torch, transformers, trl and peft leave ~0.5 M tracked objects once imported;
    each full collection walks them all (~0.4 s on 2 cores), a short run makes a few, and the interpreter's exit makes
    several more (2-3 s per process; docs/testing.md, "Suite time"). ``gc.freeze`` moves what is alive now (mostly the
    imported modules) out of every later collection, and once more at exit (an ``atexit`` hook: the interpreter's
    final passes then skip it). Nothing changes but that: objects still die by reference counting, later cyclic
    garbage is still collected, and Python never promised finalizers for what is alive at exit. Not for a long-lived
    process that calls entry points in-process (a test session): what is alive at a call is never collected after."""
    import atexit
    import gc

    gc.freeze()
    if not getattr(skip_final_collections, "registered", False):
        atexit.register(gc.freeze)
        skip_final_collections.registered = True


STDOUT_CLOSED = 141  # 128 + SIGPIPE: the exit status of a command whose reader went away (``yes | head -1``)


def stdout_closed(exc: BrokenPipeError) -> int:
    """The exit status for a BrokenPipeError: :data:`STDOUT_CLOSED` when it is standard output that is closed (the
    reader of ``alignkit init sft | head -1`` took what it wanted and left), with standard output pointed at
    /dev/null so the interpreter's last flush fails no more, instead of a traceback. Re-raises ``exc`` when standard
    output still writes (a pipe to a child process broke: a real error)."""
    import os
    import select
    import sys

    try:
        fd = sys.stdout.fileno()
        poll = select.poll()
        poll.register(fd, select.POLLOUT)  # a pipe whose reader left polls POLLERR
        gone = any(events & (select.POLLERR | select.POLLHUP) for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll here, or no file behind stdout: take it as closed
        fd, gone = None, True
    if not gone:
        raise exc
    if fd is not None:
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
        except OSError:
            pass
    return STDOUT_CLOSED


def run_cli(main, argv=None, process_entry: bool | None = None):
    """Run a command-line entry point. Bad input (an AlignkitError, found before training starts) prints its message,
    which names the file, row or key and the fix, instead of a traceback through alignkit's internals, and exits 2;
    a run stopped on a NaN/Inf loss exits 1; output cut off by its reader (``| head``) exits 141 without a
    traceback (:func:`stdout_closed`). ``ALIGNKIT_TRACEBACK=1`` re-raises, for debugging. ``process_entry``
    (default: ``argv`` is None, i.e. ``main`` reads this process's own command line) applies
    :func:`skip_final_collections`; in-process calls with an argv leave the collector alone."""
    import os
    import sys

    if process_entry if process_entry is not None else argv is None:
        skip_final_collections()
    try:
        return main(argv)
    except BrokenPipeError as exc:
        raise SystemExit(stdout_closed(exc)) from None
    except AlignkitError as exc:
        if os.environ.get("ALIGNKIT_TRACEBACK") == "1":
            raise
        if int(os.environ.get("RANK", "0")) == 0:  # under a launcher every rank fails alike: say it once
            print(f"alignkit: {type(exc).__name__}: {redact(str(exc))}", file=sys.stderr, flush=True)
        elif int(os.environ.get("WORLD_SIZE", "1")) > 1 and isinstance(exc, (ConfigError, DataError, PreflightError)):
            import time

            # the launcher stops every rank when the first one exits: give rank 0 (on a loaded machine, seconds
            # behind) the time to say it; its exit ends this wait
            time.sleep(RANK_WAITS_FOR_RANK_0)
        raise SystemExit(getattr(exc, "exit_code", 1 if isinstance(exc, NonFiniteLossError) else 2)) from None
