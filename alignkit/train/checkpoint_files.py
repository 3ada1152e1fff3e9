"""Check a checkpoint-N folder before a run resumes from it: the manifest alignkit wrote after the save
(``alignkit_checkpoint.json``: every file, its size and sha256, and the manifest's own checksum) is readable and
whole, every file it lists is there with that size and hash, and each file reads as its kind (trainer_state.json and the other JSON files parse, the adapter or model safetensors
header and data extent hold, optimizer.pt / scheduler.pt / rng_state.pth are intact torch archives). A damaged file
is one PreflightError naming it, with the previous checkpoint to resume from."""

from __future__ import annotations

from pathlib import Path

from alignkit.errors import PreflightError
from alignkit.models.folders import check_manifest
from alignkit.train.callbacks import CHECKPOINT_MANIFEST, checkpoint_step, checkpoints


def marked(folder: Path) -> bool:
    """True once the save finished: alignkit wrote the manifest (a checkpoint without one was cut short)."""
    return (Path(folder) / CHECKPOINT_MANIFEST).is_file()


def check_checkpoint(folder: str | Path) -> Path:
    """``folder`` when every file of the checkpoint is whole; else PreflightError naming the file and the fix."""
    folder = Path(folder)
    older = [p for p in checkpoints(folder.parent) if marked(p) and checkpoint_step(p) < (checkpoint_step(folder) or 0)]
    if older:
        fix = f"resume from the previous checkpoint: --resume_from_checkpoint {older[-1]}"
    else:
        fix = "start the run over (overwrite_output_dir: true); no earlier checkpoint is left"
    fix += " (or restore this file from a backup)"
    check_manifest(folder, fix)
    return folder


def check_resumable(folder: str | Path) -> None:
    """For a resume by path: a checkpoint whose save finished and whose files are whole."""
    if not marked(folder):
        raise PreflightError(f"resume_from_checkpoint: {folder} is incomplete (cut short while saving, or not written "
                             "by alignkit). Fix: give a complete checkpoint, or start the run without resuming.")  # fmt: skip
    check_checkpoint(folder)
