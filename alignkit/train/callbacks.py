"""Trainer callbacks the run loop adds to every stage."""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from alignkit.errors import NonFiniteLossError

logger = logging.getLogger(__name__)


class NonFiniteGuard(TrainerCallback):
    """Stop on a NaN/Inf loss or gradient *before* the optimizer step writes it into the weights.

    Raising here leaves the output dir as it was after the last save, so the last good checkpoint is intact.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.model = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model = model

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not self.enabled or self.model is None or args.deepspeed:
            return
        for name, param in self.model.named_parameters():
            if param.grad is not None and not torch.isfinite(param.grad).all():
                raise _stopped(args, f"step {state.global_step + 1}: non-finite gradient in {name}, before the update")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.enabled or not logs:
            return
        for key in ("loss", "grad_norm"):
            value = logs.get(key)
            if isinstance(value, float) and not math.isfinite(value):
                raise _stopped(args, f"step {state.global_step}: {key} is {value}; training stopped")


def _stopped(args, what: str) -> NonFiniteLossError:
    last = last_complete_checkpoint(args.output_dir)
    kept = f"the last good checkpoint, {last}, is intact" if last else f"no checkpoint in {args.output_dir} yet"
    return NonFiniteLossError(
        f"{what}; {kept}. Fix: lower learning_rate (or raise warmup_steps), check the data for extreme values, then "
        "rerun with resume_from_checkpoint: true."
    )


class ResolvedConfigToWandb(TrainerCallback):
    """Log alignkit's whole resolved config (model, quantization, adapter, data groups) to the W&B run."""

    def __init__(self, resolved: dict):
        self.resolved = resolved

    def on_train_begin(self, args, state, control, **kwargs):
        try:
            import wandb

            if wandb.run is not None:
                wandb.run.config.update({"alignkit": self.resolved}, allow_val_change=True)
        except ImportError:
            pass


# A checkpoint folder counts only once this manifest is in it. transformers writes checkpoint-N file by file and
# its get_last_checkpoint takes the highest N whatever is inside, so a kill mid-save would leave a folder that looks
# resumable but is not; alignkit's resume takes the highest checkpoint whose manifest matches its files.
CHECKPOINT_MANIFEST = "alignkit_checkpoint.json"
# transformers pickles TrainingArguments into every save; nothing reads it back, the resolved config is in
# alignkit_config.yaml, and a pickle in the outputs breaks "safetensors only" (loading it can run code).
PICKLED_ARGS = "training_args.bin"


def checkpoint_step(path: Path) -> int | None:
    match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", path.name)
    return int(match.group(1)) if match and path.is_dir() else None


def _files(folder: Path) -> dict[str, int]:
    """Sizes of the checkpoint's files, the manifest (and a leftover of writing it) aside."""
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(CHECKPOINT_MANIFEST)
    }


def checkpoint_is_complete(folder: Path) -> bool:
    """True when the manifest was written after every file, and the files still have the sizes it lists."""
    try:
        listed = json.loads((folder / CHECKPOINT_MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    present = _files(folder)
    return all(present.get(name) == size for name, size in listed.items())


def checkpoints(output_dir: Path) -> list[Path]:
    """checkpoint-N folders of ``output_dir``, oldest step first."""
    found = [p for p in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*") if checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def last_complete_checkpoint(output_dir: Path) -> Path | None:
    return next((p for p in reversed(checkpoints(output_dir)) if checkpoint_is_complete(p)), None)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicCheckpoints(TrainerCallback):
    """Mark each checkpoint complete once transformers has written all of it (model, optimizer, scheduler, RNG,
    trainer state), with its files flushed to disk first; and unmark checkpoints this run will write again."""

    def on_train_begin(self, args, state, control, **kwargs):
        # Checkpoints past the step this run starts from belong to another trajectory (an overwritten run, or the
        # future of an earlier checkpoint resumed by path). This run rewrites them file by file, so they stop counting.
        if state.is_world_process_zero:
            for folder in checkpoints(args.output_dir):
                if checkpoint_step(folder) > state.global_step and (folder / CHECKPOINT_MANIFEST).is_file():
                    (folder / CHECKPOINT_MANIFEST).unlink()
                    logger.warning("%s: from another run; no longer a resume candidate", folder)

    def on_save(self, args, state, control, **kwargs):
        from accelerate import PartialState

        PartialState().wait_for_everyone()  # every rank has written its shards
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        (folder / PICKLED_ARGS).unlink(missing_ok=True)
        files = _files(folder)
        for name in files:
            _fsync(folder / name)
        tmp = folder / f"{CHECKPOINT_MANIFEST}.tmp"
        tmp.write_text(json.dumps({"step": state.global_step, "files": files}, indent=1))
        _fsync(tmp)
        tmp.replace(folder / CHECKPOINT_MANIFEST)
        _fsync(folder)
