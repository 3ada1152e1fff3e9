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

from alignkit.errors import DivergenceError, NonFiniteLossError
from alignkit.models.folders import CHECKPOINT_MANIFEST, file_sha256, manifest_digest

logger = logging.getLogger(__name__)


class NonFiniteGuard(TrainerCallback):
    """Stop on a NaN/Inf loss or gradient *before* the optimizer step writes it into the weights, and on a run that
    has diverged without a NaN: a gradient norm of exactly 0 for ``ZERO_GRAD_STEPS`` logged steps at a non-zero
    learning rate (saturated weights: ``learning_rate: 1e6`` gives a flat loss and grad norm 0 from step 2), or a
    loss above ``LOSS_JUMP`` x the median of the last logged ones, above ``LOSS_FLOOR`` (a fitted run's loss of
    ~1e-4 moving to ~1e-3 is noise, not divergence: seen on tool-call SFT, benchmarks/tool_sft.py), and
    ``LOSS_UNDONE`` of the way back from that median to the run's early loss (the median of its first logged ones): a
    converged loss is small, so a bump of a few tenths of a nat is a large ratio that undoes almost nothing of what
    the run learned (a MiniLM QA run at ~0.06, down from ~6, was stopped for 0.29), while a diverging run climbs back
    toward where it started. A run whose loss never fell has nothing to undo: the ratio alone decides there.

    Raising here leaves the output dir as it was after the last save; the message names the last checkpoint saved
    before the trouble began, and a command that trains on from it.
    """

    ZERO_GRAD_STEPS = 3
    LOSS_JUMP = 4.0
    LOSS_FLOOR = 0.1  # nats per token
    LOSS_UNDONE = 0.25  # share of the fall from the early loss to the recent median that a jump must climb back
    EARLY = 5  # logged losses whose median is the run's early loss

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.model = None
        self.losses: list[float] = []
        self.zero_since: int | None = None
        self.zero_steps = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model = model

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not self.enabled or self.model is None or args.deepspeed:
            return
        named = [(name, p.grad) for name, p in self.model.named_parameters() if p.grad is not None]
        if not named:
            return
        # one fused norm over every gradient (a NaN or inf anywhere makes it non-finite), one sync: a LoRA model has
        # hundreds of gradient tensors, and a check per tensor was ~1,000 small ops and as many syncs per step
        total = torch.nn.utils.get_total_norm([g for _, g in named], error_if_nonfinite=False)
        if math.isfinite(float(total)):
            return
        for name, grad in named:  # name the tensor (a finite gradient whose norm overflows fp32 names none)
            if not torch.isfinite(grad).all():
                raise _stopped(args, f"step {state.global_step + 1}: non-finite gradient in {name}, before the update")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.enabled or not logs:
            return
        step = state.global_step
        for key in ("loss", "grad_norm"):
            value = logs.get(key)
            if isinstance(value, float) and not math.isfinite(value):
                raise _stopped(args, f"step {step}: {key} is {value}; training stopped")
        if "reward" in logs:  # RL (GRPO): the loss is a policy-gradient surrogate, 0 when a group's rewards tie
            self._warn_flat_rewards(step, logs)
            return
        grad_norm, lr, loss = logs.get("grad_norm"), logs.get("learning_rate") or 0, logs.get("loss")
        # Online DPO: a step whose sampled pairs all tied (every chosen scored as its rejected; often the same text,
        # whose DPO loss is log 2 with gradient exactly 0) has nothing to learn from: not evidence of divergence, so
        # it neither counts toward nor breaks a run of zero-gradient steps.
        tied = logs.get("objective/scores_margin") == 0
        if "objective/scores_margin" in logs:
            self._warn_flat_rewards(step, {"frac_reward_zero_std": 1 if tied else 0})
        if grad_norm is not None and not tied:
            self.zero_steps = self.zero_steps + 1 if grad_norm == 0 and lr > 0 else 0
            self.zero_since = (self.zero_since or step) if self.zero_steps else None
            if self.zero_steps >= self.ZERO_GRAD_STEPS:
                raise _stopped(
                    args,
                    f"steps {self.zero_since}-{step}: gradient norm 0 at learning_rate {lr:g} on {self.zero_steps} "
                    "steps that had something to learn, so the model has stopped learning (its weights diverged)",
                    before=self.zero_since - 1,  # step k's gradient is of the weights step k-1 wrote
                    error=DivergenceError,
                )
        if isinstance(loss, float):
            if len(self.losses) >= 5:
                typical = _median(self.losses[-10:])
                early = _median(self.losses[: self.EARLY])
                undone = loss - typical >= self.LOSS_UNDONE * (early - typical)  # always true if it never fell
                if loss > self.LOSS_JUMP * typical and loss > self.LOSS_FLOOR and undone:
                    raise _stopped(
                        args,
                        f"step {step}: loss {loss:.4g} jumped from ~{typical:.4g} (early in the run ~{early:.4g})",
                        before=step - 1,
                        error=DivergenceError,
                    )
            self.losses.append(loss)

    def _warn_flat_rewards(self, step: int, logs: dict) -> None:
        """GRPO/RLOO learn from reward differences within a prompt's group, online DPO from the score margin of its
        sampled pair: say so once if none has any for ``ZERO_GRAD_STEPS`` logged steps."""
        flat = logs.get("frac_reward_zero_std") == 1
        self.flat_steps = getattr(self, "flat_steps", 0) + 1 if flat else 0
        if self.flat_steps == self.ZERO_GRAD_STEPS and not getattr(self, "warned_flat", False):
            self.warned_flat = True
            logger.warning(
                "steps %d-%d: every prompt's sampled completions got the same reward, so the run has nothing to learn "
                "from (advantages, or online DPO's pair margins, and gradients are 0). Fix: check reward_pattern "
                "against a few completions (alignkit generate), raise max_completion_length or temperature, or start "
                "from an SFT output that already answers in the format sometimes.",
                step - self.flat_steps + 1, step,
            )  # fmt: skip


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _stopped(args, what: str, before: int | None = None, error=NonFiniteLossError) -> NonFiniteLossError:
    """The error for a run stopped at ``what``, naming the last complete checkpoint saved before step ``before``."""
    last = last_complete_checkpoint(args.output_dir, before=before)
    lower = f"{min(args.learning_rate / 10, 2e-4):g}"
    if last:
        fix = (
            f"train on from the last good weights as a new run with a lower rate: --model_name_or_path {last} "
            f"--learning_rate {lower} --output_dir <a new folder> (a resume would repeat the same steps with the same "
            "rate, and refuses a changed one)"
        )
    else:
        fix = f"start over with a lower rate: --learning_rate {lower} --overwrite_output_dir true"
    none = (
        f"no checkpoint in {args.output_dir} from before step {before + 1}"
        if before is not None
        else f"no checkpoint in {args.output_dir} yet"
    )
    kept = f"the last good checkpoint, {last}, is intact" if last else none
    return error(f"{what}; {kept}. Fix: {fix}; or raise warmup_steps; check the data for extreme values.")


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
# (CHECKPOINT_MANIFEST, "alignkit_checkpoint.json", is defined with its checker in alignkit.models.folders.)
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


def last_complete_checkpoint(output_dir: Path, before: int | None = None) -> Path | None:
    """The newest complete checkpoint (of a step < ``before``, if given)."""
    found = [p for p in checkpoints(output_dir) if before is None or checkpoint_step(p) < before]
    return next((p for p in reversed(found) if checkpoint_is_complete(p)), None)


# Where a run moves the checkpoints of the run it replaces (overwrite_output_dir) or of the steps it retrains (a resume
# from an earlier checkpoint by path): kept whole, never taken by a resume; an overwriting run deletes it once it has
# finished (alignkit.train.output_folder.drop_replaced_checkpoints).
SUPERSEDED_DIR = "superseded-checkpoints"


def superseded(output_dir: Path) -> list[Path]:
    """The checkpoints set aside in ``output_dir``'s SUPERSEDED_DIR (every earlier run's), oldest first."""
    return sorted((Path(output_dir) / SUPERSEDED_DIR).glob(f"*/{PREFIX_CHECKPOINT_DIR}-*"))


def set_aside(output_dir: Path, after: int) -> list[Path]:
    """Move every complete checkpoint past step ``after`` into ``SUPERSEDED_DIR/<UTC time>/`` and delete the
    incomplete ones (a save a kill cut short: nothing in it can be resumed). Returns the new paths."""
    import shutil
    import time

    later = [p for p in checkpoints(output_dir) if checkpoint_step(p) > after]
    if not later:
        return []
    stamp = Path(output_dir) / SUPERSEDED_DIR / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    moved, dest, n = [], stamp, 1
    while dest.exists():  # two runs started within one second
        n += 1
        dest = stamp.with_name(f"{stamp.name}-{n}")
    for folder in later:
        if not checkpoint_is_complete(folder):
            shutil.rmtree(folder, ignore_errors=True)
            logger.warning("%s: deleted (a save cut short, not resumable; this run writes that step again)", folder)
            continue
        dest.mkdir(parents=True, exist_ok=True)
        folder.rename(dest / folder.name)  # one rename: the checkpoint is whole in one place or the other
        moved.append(dest / folder.name)
    if moved:
        logger.warning(
            "%s: %s of another run (past step %d, where this run starts) moved to %s; never resumed from",
            output_dir, ", ".join(p.name for p in moved), after, dest,
        )  # fmt: skip
    return moved


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicCheckpoints(TrainerCallback):
    """Mark each checkpoint complete once transformers has written all of it (model, optimizer, scheduler, RNG,
    trainer state), with its files flushed to disk first; unmark checkpoints this run will write again; and rotate
    (``save_total_limit``) only after the new checkpoint is complete, so that a kill at any moment leaves a complete
    checkpoint to resume from. The run loop turns transformers' own rotation off: it deletes the old checkpoints
    before the new one is marked."""

    def __init__(self, save_total_limit: int | None = None):
        self.save_total_limit = save_total_limit

    def on_train_begin(self, args, state, control, **kwargs):
        # Checkpoints past the step this run starts from belong to another trajectory (the run overwrite_output_dir
        # replaces, or the future of an earlier checkpoint resumed by path): moved aside whole, never rewritten in place
        if state.is_world_process_zero:
            set_aside(Path(args.output_dir), after=state.global_step)

    def on_save(self, args, state, control, **kwargs):
        from accelerate import PartialState

        PartialState().wait_for_everyone()  # every rank has written its shards
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        (folder / PICKLED_ARGS).unlink(missing_ok=True)
        files = _files(folder)
        hashes = {}
        for name in files:
            _fsync(folder / name)
            hashes[name] = file_sha256(folder / name)  # just written: read back from the page cache
        tmp = folder / f"{CHECKPOINT_MANIFEST}.tmp"
        # the launch that wrote it: a resume at another world size checks its batch math against these
        launch = {"world_size": args.world_size, "train_batch_size": args.world_size * args.gradient_accumulation_steps
                  * args.per_device_train_batch_size}  # fmt: skip
        manifest = {"step": state.global_step, **launch, "files": files, "sha256": hashes}
        manifest["self_sha256"] = manifest_digest(manifest)
        tmp.write_text(json.dumps(manifest, indent=1))
        _fsync(tmp)
        tmp.replace(folder / CHECKPOINT_MANIFEST)
        _fsync(folder)
        self._rotate(Path(args.output_dir), state)

    def _rotate(self, output_dir: Path, state) -> None:
        if not self.save_total_limit:
            return
        import shutil

        best = Path(state.best_model_checkpoint).name if state.best_model_checkpoint else None
        complete = [p for p in checkpoints(output_dir) if checkpoint_is_complete(p)]
        keep = set(p.name for p in complete[-self.save_total_limit :]) | ({best} if best else set())
        for folder in checkpoints(output_dir):  # incomplete leftovers older than the newest complete one go too
            if folder.name not in keep and checkpoint_step(folder) < checkpoint_step(complete[-1]):
                (folder / CHECKPOINT_MANIFEST).unlink(missing_ok=True)  # first: a kill mid-delete leaves no candidate
                shutil.rmtree(folder, ignore_errors=True)
                logger.info("deleted %s (save_total_limit %d)", folder, self.save_total_limit)
