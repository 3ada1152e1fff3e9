"""Stopping a run without losing it: SIGTERM/SIGINT (a preempted job, a cluster scheduler, Ctrl-C) and a reward
function that fails mid-run both end in a complete checkpoint, a run record that says why, and a non-zero exit.

- :class:`SignalStop`: while ``trainer.train`` runs, SIGTERM and SIGINT set a flag instead of killing the process;
  at the end of the step in progress the trainer saves a checkpoint through its own save path (so
  ``AtomicCheckpoints`` marks it complete) and stops; the run loop then raises :class:`RunInterrupted` (exit
  128 + signal). A second signal while it finishes the step stops at once, as the default handler would.
- :func:`save_now`: a checkpoint of the state as of the last finished step, for a stop raised inside a step (a
  reward function's error), unless that step's checkpoint is already saved.
- :func:`disk_full_stop`: the disk filled up while the run saved: the partial checkpoint is removed (it has no
  manifest, so no resume would take it), the last complete one is kept, and the error names the folder and the
  bytes a checkpoint of this run needs.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from alignkit.errors import DiskFullError, RewardFunctionError, RunInterrupted
from alignkit.train.callbacks import CHECKPOINT_MANIFEST, checkpoint_is_complete, last_complete_checkpoint

logger = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class SignalStop(TrainerCallback):
    """Install with ``with SignalStop() as stop: trainer.add_callback(stop); trainer.train()``; ``stop.signum`` is
    the signal that stopped the run (None if none came)."""

    def __init__(self):
        self.signum: int | None = None
        self.since = 0.0  # when the signal came (or another rank's was agreed on)
        self.previous: dict[int, object] = {}

    def __enter__(self) -> SignalStop:
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            for sig in SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()

    def _handle(self, signum, frame) -> None:
        import time

        if self.signum is not None and time.monotonic() - self.since < 2:
            return  # the same Ctrl-C twice: from the terminal (to the process group) and forwarded by the launcher
        if self.signum is not None:  # asked twice: stop now
            self.__exit__()
            signal.raise_signal(signum)
            return
        self.signum, self.since = signum, time.monotonic()
        logger.warning("%s: saving a checkpoint at the end of this step, then stopping (again to stop at once)",
                       signal.Signals(signum).name)  # fmt: skip

    def error(self, step: int, output_dir) -> RunInterrupted:
        """What the run loop raises once the trainer stopped on the signal (exit 128 + signal)."""
        return RunInterrupted(
            f"{signal.Signals(self.signum).name}: the run stopped at step {step} and saved a checkpoint in "
            f"{output_dir}. Fix: run the same command with resume_from_checkpoint: true to go on.",
            self.signum,
        )

    def on_step_end(self, args, state, control, **kwargs):
        agreed = _agreed_signal(self.signum, args)
        if agreed is not None and self.signum is None:  # another rank's signal: this rank's own is on its way
            import time

            self.signum, self.since = agreed, time.monotonic()
        if self.signum is not None:
            control.should_save = True
            control.should_training_stop = True
        return control


def _agreed_signal(signum: int | None, args) -> int | None:
    """The signal any rank got, the same on every rank (one tiny all-reduce per step under several processes): the
    launcher forwards SIGTERM to each rank at a slightly different moment, and a rank that stopped a step before the
    others would leave them waiting in a collective ("Connection closed by peer")."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return signum
    flag = torch.tensor([signum or 0], dtype=torch.int64, device=args.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) or None


def reward_stopped(trainer, exc: RewardFunctionError) -> RewardFunctionError:
    """``exc`` (a reward function failed inside a step) after saving the state as of the last finished step; its
    message names the checkpoint saved."""
    saved = save_now(trainer)
    return RewardFunctionError(str(exc).replace("saved a checkpoint", f"saved {saved}" if saved else
                                                "had saved no checkpoint yet"))  # fmt: skip


def save_now(trainer) -> Path | None:
    """Save checkpoint-<global_step> through the trainer's save path and mark it complete; the existing one if that
    step is already saved; None if no step has finished."""
    step = trainer.state.global_step
    folder = Path(trainer.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"
    if step == 0:
        return None
    if checkpoint_is_complete(folder):
        return folder
    trainer._save_checkpoint(trainer.model, trial=None)  # transformers' own checkpoint writer (model, optimizer, RNG)
    trainer.control = trainer.callback_handler.on_save(trainer.args, trainer.state, trainer.control)
    return folder


def disk_full_stop(trainer, output_dir: Path, final: bool = False) -> DiskFullError:
    """The error for a run whose save hit a full disk (``final``: the save of the finished model into
    ``output_dir``, else a checkpoint), after removing the partial checkpoint-<step> this run was writing. The bytes
    needed: the size of the last complete checkpoint (its manifest), else trainable weights + Adam moments."""
    import json
    import shutil

    from alignkit.export.outputs import disk_full_error, tree_bytes
    from alignkit.train.checks import _checkpoint_bytes

    output_dir = Path(output_dir)
    folder = output_dir / f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
    partial = folder.is_dir() and not (folder / CHECKPOINT_MANIFEST).is_file()
    if partial and not final:
        shutil.rmtree(folder, ignore_errors=True)  # this run's own half-written save: never resumable, only in the way
    last = last_complete_checkpoint(output_dir)
    needed = 0
    if last is not None:
        try:
            needed = sum(json.loads((last / CHECKPOINT_MANIFEST).read_text())["files"].values())
        except (OSError, ValueError, KeyError, TypeError):
            needed = tree_bytes(last)
    needed = needed or _checkpoint_bytes(trainer.model)
    kept = f"The last complete checkpoint, {last.name}, is intact" if last else "No checkpoint was complete yet"
    if final:
        kept += f"; the final save into {output_dir} is incomplete (alignkit_run.json says so)."
        fix = "free the space and run the same command with resume_from_checkpoint: true (from the last checkpoint)"
        return disk_full_error(output_dir, needed, "the finished model", kept, fix)
    kept += f"; the partial {folder.name} was removed." if partial else "."
    fix = "run the same command with resume_from_checkpoint: true" if last else "run the same command again"
    return disk_full_error(output_dir, needed, f"{folder.name}", kept, fix)
