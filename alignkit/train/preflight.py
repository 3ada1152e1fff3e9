"""Run-level checks made before the first training step; each failure is one PreflightError naming the path or key
and the fix. The other preflight checks live with what they check and run earlier in every recipe: config keys and
combinations (alignkit.config), every data row (alignkit.data.schemas, alignkit.tasks), the tokenizer contract
(alignkit.models.tokenizer), weights format and LoRA target modules (alignkit.models.loader), Hub token and repo
write access when push_to_hub is set (alignkit.export.hub.preflight_push).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path

from alignkit import runtime
from alignkit.errors import ConfigError, DataError, PreflightError, redact
from alignkit.runs import RunRecord
from alignkit.train.callbacks import (
    CHECKPOINT_MANIFEST,
    checkpoint_is_complete,
    checkpoints,
    last_complete_checkpoint,
)

logger = logging.getLogger(__name__)


class OutputDirLock:
    """An exclusive lock on ``output_dir`` for the life of one run, so a second run into it is refused instead of
    writing over the first. It is a ``flock`` on the directory itself: nothing is written into the folder, and the
    kernel drops the lock when the holding process ends however it ends, so a lock is never stale. Rank 0 takes it
    for all ranks of a launch. ``release`` also removes the folder if this run created it and it is still empty (a
    run that failed before writing anything leaves nothing behind)."""

    def __init__(self, output_dir: Path):
        self.output_dir = Path(output_dir)
        self.fd: int | None = None
        self.created = False

    def acquire(self) -> None:
        import fcntl

        out = self.output_dir
        self.created = not out.exists()
        try:
            out.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise PreflightError(
                f"output_dir {out}: not writable ({exc.strerror}). Fix: choose a writable output_dir."
            ) from exc
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(out)
            self.release()
            raise PreflightError(
                f"output_dir {out}: in use by another alignkit run that is still going ({holder}). Fix: wait for it "
                "to finish, or choose another output_dir. Do not resume into or overwrite a live run."
            ) from None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # drops the flock
            self.fd = None
        if self.created:
            try:
                self.output_dir.rmdir()  # only if still empty
            except OSError:
                pass


def _lock_holder(folder: Path) -> str:
    """'pid N on host H: <command>' of the process holding the flock on ``folder`` (from /proc/locks)."""
    import socket

    st = os.stat(folder)
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


# Keys a resumed run may change, and that take effect when it does: how long to go on, how many checkpoints to keep,
# where to report. (How often to save, log or evaluate is restored from the checkpoint's trainer state by
# transformers, so a change there would be silently ignored: it is refused like the rest.)
RESUMABLE_CHANGES = {
    "resume_from_checkpoint", "overwrite_output_dir", "max_steps", "num_train_epochs", "save_total_limit",
    "report_to", "run_name", "disable_tqdm", "min_free_disk_gb", "push_to_hub", "hub_model_id", "hub_private_repo",
    "wandb_group", "output_dir", "logging_dir", "dataloader_num_workers", "label_preview",
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
# among ranks (the rows per step must not change) and the CPU process-group backend (runtime.fit_backend_to_device).
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


RUN_ID_FILE = ".alignkit_run_id"


def check_shared_output_dir(output_dir: Path) -> None:
    """In a launch of several processes: every rank sees the same ``output_dir``. Rank 0 writes a fresh run id
    there, every rank reads it back, and all ranks compare notes (a gloo/nccl all-gather); on another node a path
    that is a local disk instead of the shared one shows no file or another run's id. Each node would otherwise save
    its own share of every checkpoint, and no node could resume. Raises the same PreflightError on every rank (so
    none waits for the others at the next collective). Needs the process group, so it runs once the trainer is
    built, before the first step."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    import socket
    import uuid

    path, rank, host = Path(output_dir) / RUN_ID_FILE, dist.get_rank(), socket.gethostname()
    run_id = [f"{uuid.uuid4().hex} {host}" if rank == 0 else None]
    if rank == 0:
        path.write_text(run_id[0])
    dist.broadcast_object_list(run_id, src=0)
    try:
        seen = path.read_text().strip()
    except OSError:
        seen = None
    problem = None
    if seen != run_id[0]:
        problem = f"rank {rank} on {host} finds {'no such file' if seen is None else f'another id ({seen})'}"
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    if rank == 0:
        path.unlink(missing_ok=True)  # everyone has read it
    bad = [p for p in problems if p]
    if bad:
        raise PreflightError(
            f"output_dir {output_dir}: not the same folder on every node: rank 0 wrote run id {run_id[0]!r} to "
            f"{path}, and {'; '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}. Checkpoints would be split across "
            "the nodes' disks and could not be resumed. Fix: put output_dir on storage every node mounts at the "
            "same path (NFS, Lustre, GPFS, ...) and pass that path."
        )
    if rank == 0:
        logger.info("output_dir %s: the same folder on all %d ranks (run id checked)", output_dir, len(problems))


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


# Adapter settings that a 'continue' hand-off cannot apply: the adapter being continued already has its own.
_ADAPTER_KEYS = {
    "lora_r": "r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout", "use_dora": "use_dora",
    "use_rslora": "use_rslora", "lora_target_modules": "target_modules",
}  # fmt: skip


def check_handoff(recipe, source) -> None:
    """With ``adapter_handoff: continue`` an earlier stage's adapter keeps training as it is: an adapter setting the
    recipe sets to another value cannot apply, and is refused rather than silently ignored. (That the adapter's head
    is this stage's is :func:`check_model_fits`'s, which runs first.)"""
    if source.adapter_dir is None or recipe.model.adapter_handoff != "continue" or not recipe.adapter.use_peft:
        return
    config = json.loads((Path(source.adapter_dir) / "adapter_config.json").read_text())
    clashes = []
    for key, peft_key in _ADAPTER_KEYS.items():
        if key not in recipe.explicit or peft_key not in config:
            continue
        want, have = getattr(recipe.adapter, key), config[peft_key]
        if key == "lora_target_modules" and not isinstance(want, str):
            want, have = sorted(want), sorted(have) if isinstance(have, list) else have
        if want != have:
            clashes.append(f"{key} {want!r} (the adapter has {have!r})")
    if clashes:
        raise PreflightError(
            f"adapter_handoff continue: {source.adapter_dir}'s adapter keeps training as it is, so {', '.join(clashes)} "
            "cannot apply. Fix: drop those keys, or set adapter_handoff: merge to merge it and train a new adapter with them."
        )


LENGTH_KEYS = ("block_size", "max_length", "max_seq_length", "max_target_length", "generation_max_length")


def check_model_fits(recipe, source, head: str = "causal_lm") -> None:
    """Before the tokenizer and data: the model's config fits the stage (a causal-LM stage needs a decoder, an
    earlier stage's adapter continues only with its head: models.loader.check_head_fits), and so do the sequence
    lengths the recipe sets (``block_size``, ``max_length``, ``max_target_length``, ``generation_max_length``) fit
    its positions (``max_position_embeddings`` / ``n_positions``): beyond them learned position embeddings index out
    of range and RoPE models train on positions they never saw. A model whose RoPE is scaled (``rope_type`` other
    than ``default``: linear, dynamic, yarn, ...) extends its context on purpose, and its lengths are not checked.
    Only lengths the recipe sets are checked: the upstream defaults are cut to the data."""
    from alignkit.models.loader import check_head_fits, load_config

    config = load_config(recipe.model, source)
    check_head_fits(recipe.model, config, head, source)
    set_here = [k for k in LENGTH_KEYS if k in recipe.explicit]
    config = getattr(config, "text_config", None) or config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(limit, int) or rope.get("rope_type", "default") != "default":
        return
    for key in set_here:
        value = next((getattr(g, key) for g in recipe.groups if g is not None and hasattr(g, key)), None)
        if isinstance(value, int) and value > limit:
            raise PreflightError(
                f"{key}: {value} tokens is more than '{recipe.model.model_name_or_path}' has positions for "
                f"(max_position_embeddings {limit}). Fix: set {key} to at most {limit}, or extend the model's context "
                "on purpose (a RoPE model: config_overrides with rope_parameters of rope_type linear/dynamic/yarn)."
            )


def check_assistant_only_loss(splits) -> None:
    """``assistant_only_loss`` masks by the chat template's assistant turns, so it needs chat rows; trl 1.16 raises
    a ValueError at trainer set-up for text prompt/completion rows (which train on the completion only anyway)."""
    from alignkit.errors import ConfigError

    for split, data in splits.items():
        if "messages" in data.column_names or not len(data):
            continue
        if isinstance(data[0].get("prompt"), str):
            raise ConfigError(
                f"assistant_only_loss: true needs chat rows ('messages', or prompt/completion as message lists); the "
                f"{split} split has text prompt/completion rows, which train on the completion only already. Fix: "
                "set assistant_only_loss: false for this data."
            )


def protect_hub_token(train_args) -> None:
    """Keep a hub_token out of everything the run writes. transformers pickles its arguments into its saves, and W&B
    records the command line in its run metadata. The Hub client reads HF_TOKEN from the environment, so the token
    moves there, out of the arguments, and is blanked in sys.argv."""
    token = getattr(train_args, "hub_token", None)
    if token:
        os.environ["HF_TOKEN"] = token
        train_args.hub_token = None
        sys.argv[:] = [arg.replace(token, "<hub_token>") for arg in sys.argv]


def check_stop_tokens(trainer, split: str, data, max_fraction: float) -> int:
    """Count the rows of a tokenized SFT split whose trained tokens lost a stop token (eos, end-of-turn) to
    truncation: fewer stop tokens among the labels than trained spans (assistant turns, or the completion); for DPO
    rows, prompt + the longer response beyond max_length (trl's collator keeps the start). Warns with the count;
    refuses the run above ``max_fraction`` of the rows. Returns the count. Packed data is not checked."""
    import numpy as np

    tokenizer = trainer.processing_class
    stops = getattr(tokenizer, "alignkit_stop_ids", None)
    columns = data.column_names or []
    max_length = getattr(trainer.args, "max_length", None)
    if not stops or getattr(trainer.args, "packing", False):
        return 0
    stops, cut = np.asarray(stops), 0
    if {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(columns):
        # DPO: trl's collator cuts prompt + response to max_length from the end (keep_start): the response's eos goes
        if max_length is None or getattr(trainer.args, "truncation_mode", "keep_start") != "keep_start":
            return 0
        for prompt, chosen, rejected in zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"]):
            cut += len(prompt) + max(len(chosen), len(rejected)) > max_length
    elif "labels" in columns:
        for labels in data["labels"]:
            labels = np.asarray(labels)
            trained = labels != -100
            spans = int(trained[0]) + int(np.count_nonzero(trained[1:] & ~trained[:-1])) if len(labels) else 0
            if spans and np.count_nonzero(np.isin(labels[trained], stops)) < spans:
                cut += 1
    else:
        return 0
    if cut:
        share = cut / len(data)
        what = (
            f"max_length {max_length} cuts the stop token ({tokenizer.convert_ids_to_tokens(stops[0].item())!r}) "
            f"off {cut} of {len(data)} {split} rows ({share:.0%}): trained so, the model learns not to stop"
        )
        if share > max_fraction:
            raise DataError(
                f"{split} split", None, what,
                f"raise max_length (the longest rows need more tokens), shorten those rows, or set "
                f"max_truncated_fraction above {share:.2f} to train on them anyway",
            )  # fmt: skip
        logger.warning("%s (max_truncated_fraction %g allows it)", what, max_fraction)
    return cut


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
    args = trainer.args
    for split, data in (("train", trainer.train_dataset), ("test", trainer.eval_dataset)):
        if data is None or not hasattr(data, "__len__"):  # streamed data has no length
            continue
        if len(data) == 0:
            max_length = getattr(args, "max_length", None)
            raise DataError(
                f"{split} split", None,
                f"no rows left after tokenization (rows whose trained part falls beyond max_length {max_length} are "
                "dropped)", "raise max_length, or shorten the prompts" + (", or set test_size: 0" if split == "test" else ""),
            )  # fmt: skip
        check_stop_tokens(trainer, split, data, run_args.max_truncated_fraction)
    if args.save_strategy == "no":
        return
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
