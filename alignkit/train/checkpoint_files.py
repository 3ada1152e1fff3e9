"""Check a checkpoint-N folder before a run resumes from it: the manifest alignkit wrote after the save
(``alignkit_checkpoint.json``: every file and its size) is readable, every file it lists is there with that size, and
each file reads as its kind (trainer_state.json and the other JSON files parse, the adapter or model safetensors
header and data extent hold, optimizer.pt / scheduler.pt / rng_state.pth are intact torch archives). A damaged file
is one PreflightError naming it, with the previous checkpoint to resume from."""

from __future__ import annotations

from pathlib import Path

from alignkit.errors import PreflightError
from alignkit.models.folders import check_file, check_json, damaged
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
    listed = check_json(folder / CHECKPOINT_MANIFEST, fix).get("files")
    if not isinstance(listed, dict):
        raise damaged(folder / CHECKPOINT_MANIFEST, "damaged: it lists no files", fix)
    for name, size in listed.items():
        path = folder / name
        if not path.is_file():
            raise damaged(path, "missing from the checkpoint (its manifest lists it)", fix)
        actual = path.stat().st_size
        if actual != size:
            raise damaged(path, f"damaged: {actual} bytes, but the checkpoint was saved with {size}", fix)
        check_file(path, fix)
    return folder


def check_resumable(folder: str | Path) -> None:
    """For a resume by path: a checkpoint whose save finished and whose files are whole."""
    if not marked(folder):
        raise PreflightError(f"resume_from_checkpoint: {folder} is incomplete (cut short while saving, or not written "
                             "by alignkit). Fix: give a complete checkpoint, or start the run without resuming.")  # fmt: skip
    check_checkpoint(folder)
