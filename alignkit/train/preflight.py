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

from alignkit.errors import DataError, PreflightError, redact
from alignkit.runs import RunRecord
from alignkit.train.callbacks import checkpoint_is_complete, checkpoints, last_complete_checkpoint

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


def check_resume_unchanged(saved_config: Path, resolved: dict) -> None:
    """A resumed run restores the optimizer and scheduler of its checkpoint, so a changed learning rate, batch,
    adapter or data would be silently ignored (or silently mixed): refuse, naming every changed key."""
    import yaml

    if not saved_config.is_file():
        return
    before = {k: v for group in (yaml.safe_load(saved_config.read_text()) or {}).values() for k, v in group.items()}
    now = {k: v for group in resolved.values() for k, v in group.items()}
    changed = sorted(k for k in now if k in before and before[k] != now[k] and k not in RESUMABLE_CHANGES)
    if changed:
        diff = ", ".join(f"{k}: {before[k]!r} -> {now[k]!r}" for k in changed)
        raise PreflightError(
            f"resume_from_checkpoint: the recipe differs from the run being resumed ({diff}); a resume restores the "
            "checkpoint's optimizer, schedule and trainer state, and would not apply it. Fix: resume with the run's own values (they are "
            f"in {saved_config}), or start a new run (another output_dir, or overwrite_output_dir: true) with the new ones."
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
