"""Run-level checks made before the first training step; each failure is one PreflightError naming the path or key
and the fix. The other preflight checks live with what they check and run earlier in every recipe: config keys and
combinations (alignkit.config), every data row (alignkit.data.schemas, alignkit.tasks), the tokenizer contract
(alignkit.models.tokenizer), weights format and LoRA target modules (alignkit.models.loader), Hub token and repo
write access when push_to_hub is set (alignkit.export.hub.preflight_push).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

from alignkit.errors import PreflightError
from alignkit.runs import RunRecord
from alignkit.train.callbacks import checkpoint_is_complete, checkpoints, last_complete_checkpoint

logger = logging.getLogger(__name__)


def wants_resume(resume) -> bool:
    # a YAML true/false reaches this str field as "yes"/"no" (alignkit.config.parser._coerce)
    return resume not in (None, False) and str(resume).lower() not in ("", "false", "no")


def check_output_dir(output_dir: Path, run_args, resume) -> None:
    """Never replace a finished run or start over unfinished checkpoints unasked; the dir must take writes."""
    out = Path(output_dir)
    asked = run_args.overwrite_output_dir or wants_resume(resume) or run_args.label_preview
    previous = RunRecord.read(out) if not asked else None
    if previous is not None and previous.finished:
        raise PreflightError(
            f"{out}: holds a finished {previous.stage} run. Fix: choose another output_dir, or set "
            "overwrite_output_dir: true to replace it."
        )
    if checkpoints(out) and not asked:
        raise PreflightError(
            f"{out}: holds checkpoints of an unfinished run. Fix: set resume_from_checkpoint: true to continue it, "
            "or overwrite_output_dir: true to start over."
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".alignkit_write_probe.{os.getpid()}"  # one per rank: ranks probe the same dir at once
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise PreflightError(
            f"output_dir {out}: not writable ({exc.strerror}). Fix: choose a writable output_dir."
        ) from exc
    free_gb = shutil.disk_usage(out).free / 2**30
    if free_gb < run_args.min_free_disk_gb:
        raise PreflightError(
            f"output_dir {out}: only {free_gb:.1f} GiB free, below min_free_disk_gb={run_args.min_free_disk_gb}. "
            "Fix: free disk space or choose another output_dir."
        )


def resolve_resume(output_dir: Path, resume) -> str | None:
    """``resume_from_checkpoint``: true/latest -> the newest *complete* checkpoint in output_dir; a path -> that
    checkpoint, if complete. A checkpoint a kill cut short is never resumed from."""
    if not wants_resume(resume):
        return None
    if str(resume).lower() in ("true", "yes", "latest"):
        last = last_complete_checkpoint(output_dir)
        if last is None:
            partial = ", ".join(p.name for p in checkpoints(output_dir))
            found = f"only incomplete checkpoints ({partial}: cut short while saving)" if partial else "no checkpoint"
            raise PreflightError(
                f"resume_from_checkpoint: true, but {output_dir} holds {found}. Fix: start the run without "
                "resume_from_checkpoint (with overwrite_output_dir: true), or give the path of a complete checkpoint."
            )
        every = checkpoints(output_dir)
        skipped = [p.name for p in every[every.index(last) + 1 :]]
        if skipped:
            logger.warning("resume: skipping incomplete %s (cut short while saving); resuming from %s", skipped, last)
        return str(last)
    path = Path(resume)
    if not path.is_dir():
        raise PreflightError(
            f"resume_from_checkpoint: {resume} is not a folder. Fix: give a checkpoint-N folder, or true for the latest."
        )
    if not checkpoint_is_complete(path):
        last = last_complete_checkpoint(path.parent)
        raise PreflightError(
            f"resume_from_checkpoint: {resume} is incomplete (cut short while saving, or not written by alignkit). "
            f"Fix: give a complete checkpoint{f' such as {last}' if last else ''}, or start the run without resuming."
        )
    return str(path)


def protect_hub_token(train_args) -> None:
    """Keep a hub_token out of everything the run writes. transformers pickles its arguments into its saves, and W&B
    records the command line in its run metadata. The Hub client reads HF_TOKEN from the environment, so the token
    moves there, out of the arguments, and is blanked in sys.argv."""
    token = getattr(train_args, "hub_token", None)
    if token:
        os.environ["HF_TOKEN"] = token
        train_args.hub_token = None
        sys.argv[:] = [arg.replace(token, "<hub_token>") for arg in sys.argv]


def _checkpoint_bytes(model) -> int:
    # trainable weights + two Adam moments, as saved in every checkpoint
    return 3 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def _planned_checkpoints(args) -> int:
    if args.save_strategy != "steps" or args.max_steps <= 0:
        return 1  # per epoch or best only, or a length in epochs: at least one
    every = args.save_steps * args.max_steps if args.save_steps < 1 else args.save_steps
    planned = max(1, int(args.max_steps // every))
    return min(planned, args.save_total_limit) if args.save_total_limit else planned


def check_trainer(trainer, run_args) -> None:
    """What is known only once the trainer has tokenized the data and wrapped the model."""
    args, rows = trainer.args, getattr(trainer.train_dataset, "__len__", None)  # streamed data has no length
    if rows is not None and rows() == 0:
        raise PreflightError(
            "training data: no rows left after tokenization (rows whose trained part falls beyond max_length are "
            "dropped). Fix: raise max_length, or shorten the prompts."
        )
    if args.save_strategy == "no":
        return
    needed_gb = _checkpoint_bytes(trainer.model) * _planned_checkpoints(args) / 2**30
    free_gb = shutil.disk_usage(args.output_dir).free / 2**30
    if free_gb < needed_gb + run_args.min_free_disk_gb:
        raise PreflightError(
            f"output_dir {args.output_dir}: the planned checkpoints need about {needed_gb:.1f} GiB, only {free_gb:.1f} "
            f"GiB is free (min_free_disk_gb={run_args.min_free_disk_gb} kept spare). Fix: set save_total_limit, "
            "raise save_steps, free disk space or choose another output_dir."
        )
