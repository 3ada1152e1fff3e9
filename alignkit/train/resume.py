"""Resuming a run: which checkpoint, whether it has steps left, whether the config changed, at which world size it was
saved (and DeepSpeed universal checkpoints to resume at another), and the one line that describes this launch.
Each failure is one PreflightError naming the path or key and the fix."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from alignkit import runtime
from alignkit.errors import ConfigError, PreflightError
from alignkit.train.callbacks import (
    CHECKPOINT_MANIFEST,
    checkpoint_is_complete,
    checkpoints,
    last_complete_checkpoint,
    superseded,
)
from alignkit.train.checkpoint_files import check_checkpoint, marked

logger = logging.getLogger(__name__)


def wants_resume(resume) -> bool:
    # a YAML true/false reaches this str field as "yes"/"no" (alignkit.config.parser._coerce)
    return resume not in (None, False) and str(resume).lower() not in ("", "false", "no")


def resolve_resume(output_dir: Path, resume) -> str | None:
    """``resume_from_checkpoint``: true/latest -> the newest *complete* checkpoint in output_dir; a path -> that
    checkpoint, if complete. A checkpoint a kill cut short is never resumed from."""
    if not wants_resume(resume):
        return None
    if str(resume).lower() in ("true", "yes", "latest"):
        done = [p for p in checkpoints(output_dir) if marked(p)]  # saves that finished; unmarked ones were cut short
        last = done[-1] if done else None
        if last is None:
            partial = ", ".join(p.name for p in checkpoints(output_dir))
            found = f"only incomplete checkpoints ({partial}: cut short while saving)" if partial else "no checkpoint"
            if aside := superseded(output_dir):  # another run's, set aside when this folder's run was replaced
                found += (
                    f" of its own run ({', '.join(str(p.relative_to(output_dir)) for p in aside[-4:])} are checkpoints "
                    "of an earlier run that an overwriting or resumed run set aside, never resumed from; give one's "
                    "path to resume_from_checkpoint to train on from it)"
                )
            raise PreflightError(
                f"resume_from_checkpoint: true, but {output_dir} holds {found}. Fix: start the run without "
                "resume_from_checkpoint (with overwrite_output_dir: true), or give the path of a complete checkpoint."
            )
        check_checkpoint(last)  # a damaged file: named, with the previous checkpoint to resume from
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
    if marked(path):
        check_checkpoint(path)
    if not checkpoint_is_complete(path):
        last = last_complete_checkpoint(path.parent)
        raise PreflightError(
            f"resume_from_checkpoint: {resume} is incomplete (cut short while saving, or not written by alignkit). "
            f"Fix: give a complete checkpoint{f' such as {last}' if last else ''}, or start the run without resuming."
        )
    return str(path)


# Keys a resumed run may change, and that take effect when it does: how long to go on, how many checkpoints to keep,
# where to report. (How often to save, log or evaluate is restored from the checkpoint's trainer state by
# transformers, so a change there would be silently ignored: it is refused like the rest.)
RESUMABLE_CHANGES = {
    "resume_from_checkpoint", "overwrite_output_dir", "max_steps", "num_train_epochs", "save_total_limit",
    "report_to", "run_name", "disable_tqdm", "min_free_disk_gb", "push_to_hub", "hub_model_id", "hub_private_repo",
    "wandb_group", "output_dir", "logging_dir", "dataloader_num_workers", "label_preview",
    "speedups",  # exact: the same numbers with or without them (alignkit.speedups)
}  # fmt: skip


def check_resume_has_steps_left(checkpoint: str, train_args) -> None:
    """A resume from the step ``max_steps`` already reached would train past it (transformers takes one more step)."""
    from alignkit.train.callbacks import checkpoint_step

    step = checkpoint_step(Path(checkpoint))
    if train_args.max_steps > 0 and step is not None and step >= train_args.max_steps:
        raise PreflightError(
            f"resume_from_checkpoint: {checkpoint} is at step {step}, and max_steps is {train_args.max_steps}: nothing "
            f"is left to train. Fix: raise max_steps (e.g. --max_steps {2 * step}) to train on, or use the run as it is."
        )


def check_resume_unchanged(saved_config: Path, resolved: dict, also_allowed: frozenset[str] = frozenset()) -> None:
    """A resumed run restores the optimizer and scheduler of its checkpoint, so a changed learning rate, batch,
    adapter or data would be silently ignored (or silently mixed): refuse, naming every changed key.
    ``also_allowed``: keys that may change on this resume too (the per-rank batch split, at another world size)."""
    import yaml

    if not saved_config.is_file():
        return
    before = {k: v for group in (yaml.safe_load(saved_config.read_text()) or {}).values() for k, v in group.items()}
    now = {k: v for group in resolved.values() for k, v in group.items()}
    allowed = RESUMABLE_CHANGES | also_allowed
    changed = sorted(k for k in now if k in before and before[k] != now[k] and k not in allowed)
    if changed:
        diff = ", ".join(f"{k}: {before[k]!r} -> {now[k]!r}" for k in changed)
        raise PreflightError(
            f"resume_from_checkpoint: the recipe differs from the run being resumed ({diff}); a resume restores the "
            "checkpoint's optimizer, schedule and trainer state, and would not apply it. Fix: resume with the run's own values (they are "
            f"in {saved_config}), or start a new run (another output_dir, or overwrite_output_dir: true) with the new ones."
        )


# Keys that follow the number of ranks, and may change on a resume at another world size: the split of a step's rows
# among ranks (the rows per step must not change) and the CPU process-group backend (config.trainers.fit_backend_to_device).
WORLD_SIZE_KEYS = frozenset({"per_device_train_batch_size", "gradient_accumulation_steps", "ddp_backend", "use_cpu"})
UNIVERSAL_TAG_FILE = "latest_universal"  # written by deepspeed.checkpoint.ds_to_universal next to the tag folders


def _zero_tag_dirs(checkpoint: Path) -> list[Path]:
    """DeepSpeed's own folders in a checkpoint-N (global_stepN; global_stepN_universal once converted)."""
    return sorted(p for p in Path(checkpoint).glob("global_step*") if p.is_dir())


def checkpoint_launch(checkpoint: Path) -> tuple[int | None, int | None]:
    """(world size, rows per optimizer step) of the launch that wrote ``checkpoint``: from alignkit's manifest, else
    the world size from DeepSpeed's files (one ``zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` per data-parallel
    rank, read by name only) and the rows unknown; (None, None) when neither tells."""
    try:
        manifest = json.loads((Path(checkpoint) / CHECKPOINT_MANIFEST).read_text())
    except (OSError, ValueError):
        manifest = {}
    if "world_size" in manifest:
        return int(manifest["world_size"]), manifest.get("train_batch_size")
    tags = [p for p in _zero_tag_dirs(checkpoint) if not p.name.endswith("_universal")]
    shards = list(tags[-1].glob("zero_pp_rank_*_mp_rank_00_optim_states.pt")) if tags else []
    return (len(shards) or None), None


def check_resume_world_size(checkpoint: str, train_args) -> bool:
    """A resume in a launch with another number of ranks than the one that wrote ``checkpoint``. Returns True when
    it resumes so (then the per-rank batch split may change), False at the same world size.

    Refused before any rank loads a model, each with the fix:
    - a DeepSpeed (ZeRO) checkpoint not converted: its optimizer state is split in one file per rank and loads only
      at its own world size (DeepSpeed fails inside ``load_checkpoint``). ``python -m
      deepspeed.checkpoint.ds_to_universal`` rewrites it per parameter (a "universal" checkpoint, DeepSpeed 0.19;
      `deepspeed.ai/tutorials/universal-checkpointing`); when the checkpoint holds one (``latest_universal``), the run
      loop sets DeepSpeed's ``checkpoint.load_universal`` and any world size loads it.
    - rows per optimizer step (ranks x ``per_device_train_batch_size`` x ``gradient_accumulation_steps``) other
      than the checkpoint's: the restored schedule, optimizer moments and data position all count in those steps.
    """
    ckpt = Path(checkpoint)
    saved_world, saved_batch = checkpoint_launch(ckpt)
    world = runtime.world_size()
    if saved_world is None or saved_world == world:
        return False
    batch = world * train_args.per_device_train_batch_size * train_args.gradient_accumulation_steps
    if saved_batch is not None and batch != saved_batch:
        per_device, rest = divmod(saved_batch, world * train_args.gradient_accumulation_steps)
        fix = (
            f"--per_device_train_batch_size {per_device}"
            if per_device and not rest
            else f"per_device_train_batch_size x gradient_accumulation_steps = {saved_batch} / {_ranks(world)}"
        )
        raise ConfigError(
            f"resume_from_checkpoint: {ckpt} trained with {saved_batch} rows per step on {_ranks(saved_world)}; this "
            f"launch of {_ranks(world)} would take {batch} ({world} x per_device_train_batch_size "
            f"{train_args.per_device_train_batch_size} x gradient_accumulation_steps "
            f"{train_args.gradient_accumulation_steps}), and the restored schedule and data position count steps of "
            f"{saved_batch} rows. Fix: keep {saved_batch} rows per step: {fix}."
        )
    tags = [p for p in _zero_tag_dirs(ckpt) if not p.name.endswith("_universal")]
    if tags and not (ckpt / UNIVERSAL_TAG_FILE).is_file():
        tag = tags[-1]
        raise ConfigError(
            f"resume_from_checkpoint: {ckpt} is a DeepSpeed ZeRO checkpoint written by {_ranks(saved_world)}, and this "
            f"launch has {world}; its optimizer state is split per rank and loads only at {saved_world}. Fix: convert "
            f"it once to a universal checkpoint, which any number of ranks loads (alignkit then resumes from it): "
            f"python -m deepspeed.checkpoint.ds_to_universal --input_folder {tag} --output_folder {tag}_universal, "
            f"then resume again; or resume with {_ranks(saved_world)}."
        )
    return True


def _ranks(n: int) -> str:
    return f"{n} rank{'s' * (n != 1)}"


def resumes_universal(checkpoint: str | None, world_changed: bool) -> bool:
    """True when the resume must load the checkpoint's DeepSpeed universal form (converted, at another world size)."""
    return bool(checkpoint) and world_changed and (Path(checkpoint) / UNIVERSAL_TAG_FILE).is_file()


def describe_launch(train_args) -> str:
    """One line of launch and batch math: ranks (machines x processes per machine, from torchrun's
    ``LOCAL_WORLD_SIZE``), rows per optimizer step = ranks x per-device batch x accumulation, and parameter
    sharding."""
    world = runtime.world_size()
    per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", world) or world)
    machines = max(1, world // max(1, per_machine))
    per_device, accumulation = train_args.per_device_train_batch_size, train_args.gradient_accumulation_steps
    zero = runtime.zero_stage(train_args)
    engine = f"DeepSpeed ZeRO-{zero}" if zero is not None else ("DDP" if world > 1 else "one process")
    return (
        f"launch: world size {world} ({machines} machine{'s' * (machines > 1)} x {per_machine} process"
        f"{'es' * (per_machine > 1)}), {engine}; effective batch {world * per_device * accumulation} rows per "
        f"optimizer step = {_ranks(world)} x per_device_train_batch_size {per_device} x gradient_accumulation_steps "
        f"{accumulation}"
    )
