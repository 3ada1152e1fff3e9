"""The one run loop every recipe uses: setup (seed, preflight) -> build (tokenizer, data, model) -> train -> save.

A recipe script keeps only what is specific to its stage (which trainer, which schema) and hands the rest here.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from alignkit import runtime, speedups
from alignkit.config import Recipe
from alignkit.config.trainers import precision_record
from alignkit.errors import ConfigError, NonFiniteLossError, RewardFunctionError
from alignkit.export.outputs import is_disk_full
from alignkit.models.loader import load_model
from alignkit.models.sources import resolve_source
from alignkit.models.tokenizer import load_tokenizer
from alignkit.runs import BaseModelRef, LineageEntry, RunRecord, alignkit_version
from alignkit.stages import STAGES, get_stage
from alignkit.train import checks, resume
from alignkit.train.assumptions import check_trainer_assumptions, set_stop_ids
from alignkit.train.callbacks import PICKLED_ARGS, AtomicCheckpoints, NonFiniteGuard, ResolvedConfigToWandb
from alignkit.train.distributed import debug_callback, end_process_group_at_exit
from alignkit.train.output_folder import (
    OutputDirLock,
    check_output_dir,
    check_output_not_input,
    check_shared_output_dir,
    drop_replaced_checkpoints,
)
from alignkit.train.rewards import CheckedReward, RewardCounts
from alignkit.train.stopping import SignalStop, disk_full_stop, reward_stopped

logger = logging.getLogger("alignkit")

CONFIG_FILE = "alignkit_config.yaml"
# A group the user exported; read once, because each stage run in this process then sets its own.
_USER_WANDB_GROUP = os.environ.get("WANDB_RUN_GROUP")


class Run:
    """One stage's run: ``with Run(recipe, stage) as run:``, then call its steps in order (load_tokenizer,
    load_data, load_model, build_trainer, train). ``stage``: a name of the stage registry (alignkit.stages);
    ``head``: the model head it trains (a row of alignkit.models.heads), by default the stage's own.

    Setup (seed, the process speed-ups, output-dir lock and checks, resume, hand-off checks, Hub and W&B) runs on
    construction; leaving the ``with`` block releases the output dir and removes, while empty, every folder this
    run created for it (``output_dir`` and its missing parents: a refused run leaves none). A preview
    (``label_preview``) neither creates nor touches ``output_dir``, nor claims a Hub repo. ``speedups``: what alignkit.speedups applied, by phase."""

    def __init__(self, recipe: Recipe, stage: str, head: str | None = None):
        self.recipe, self.stage = recipe, get_stage(stage).name
        self.head = head or STAGES[stage].head
        if self.head is None:
            raise ConfigError(f"stage {stage}: say which head it trains (Run(recipe, '{stage}', head=...)).")
        self.output_dir = Path(recipe.train.output_dir)
        self.tokenizer = None
        self.model = None
        self.head_config: dict[str, Any] = {}
        self.inference: dict[str, Any] = {}  # how the trained model is used (alignkit.tasks: Task.inference)
        if self.stage == "task":
            from alignkit.tasks import TASKS

            if self.head in TASKS:
                self.inference = TASKS[self.head].inference(recipe)
        self.speedups: dict[str, list[str]] = {}
        self.lock = OutputDirLock(self.output_dir)
        logging.basicConfig(  # before the model source: it may say the Hub cannot be reached (alignkit.hub)
            format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO, stream=sys.stdout
        )
        try:
            self.source = resolve_source(recipe.model)
            self._setup()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def close(self) -> None:
        """Release the output dir; remove each folder this run created for it (``output_dir``, then each missing parent
        it made) that is still empty (refused, or label_preview); a folder that existed before is never touched."""
        self.lock.release()

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        import transformers

        transformers.set_seed(self.recipe.train.seed)
        self.speedups["process"] = speedups.apply("process", recipe=self.recipe, stage=self.stage)
        t = self.recipe.train
        self.precision = precision_record(self.recipe)  # once per run: logged, and written to alignkit_run.json
        logger.info("precision: %s", self.precision)
        check_output_not_input(self.output_dir, self.recipe, self.source)  # before anything is written there
        preview = self.recipe.run.label_preview  # prints one batch and writes nothing: output_dir is left untouched
        if runtime.is_main_process() and not preview:
            self.lock.acquire()  # before any check: a live run's folder is never judged, resumed or overwritten
        if not preview:
            check_output_dir(self.output_dir, self.recipe.run, t.resume_from_checkpoint)
        self.resume_checkpoint = resume.resolve_resume(self.output_dir, t.resume_from_checkpoint)
        self.resume_universal = False
        if self.resume_checkpoint:
            resume.check_resume_has_steps_left(self.resume_checkpoint, t)
            rescaled = resume.check_resume_world_size(self.resume_checkpoint, t)  # another number of ranks
            self.resume_universal = resume.resumes_universal(self.resume_checkpoint, rescaled)
            resume.check_resume_unchanged(
                self.output_dir / CONFIG_FILE,
                self.recipe.resolved(),
                also_allowed=resume.WORLD_SIZE_KEYS if rescaled else frozenset(),
            )
        checks.check_model_fits(self.recipe, self.source, self.head)  # the head first: it decides what hand-off means
        checks.check_handoff(self.recipe, self.source)
        from alignkit.train.plan import preflight as memory_preflight

        plan = memory_preflight(self.recipe, self.stage)  # refuses a run that clearly cannot fit, before loading
        self.memory_plan = plan.record() if plan is not None else {}
        checks.protect_hub_token(t)
        self.hub_repo = None if preview else self._claim_hub_push()  # a preview creates no Hub repo either
        self._setup_tracking()

    def _claim_hub_push(self) -> str | None:
        """Check before training that the Hub repo can be written (created if missing). alignkit pushes once, after
        saving, with an exact file list (no checkpoints or pickles), so the Trainer's own pushes are turned off."""
        t = self.recipe.train
        if not getattr(t, "push_to_hub", False):
            return None
        from alignkit.export.hub import preflight_push

        repo_id = None
        if runtime.is_main_process():
            repo_id = preflight_push(t.hub_model_id or self.output_dir.name, private=t.hub_private_repo)
        t.push_to_hub = False
        return repo_id

    def _setup_tracking(self) -> None:
        report_to = self.recipe.train.report_to or []
        if "wandb" in (report_to if isinstance(report_to, list) else [report_to]):
            os.environ.setdefault("WANDB_PROJECT", "alignkit")
            os.environ["WANDB_RUN_GROUP"] = self.recipe.run.wandb_group or _USER_WANDB_GROUP or self.stage
            if not self.recipe.train.run_name or self.recipe.train.run_name == self.recipe.train.output_dir:
                self.recipe.train.run_name = f"{self.stage}-{self.output_dir.name}"

    # ------------------------------------------------------------------ build
    def load_tokenizer(self, **contract):
        """Load the tokenizer through the contract (see :func:`alignkit.models.tokenizer.apply_contract`)."""
        self.tokenizer = load_tokenizer(self.recipe.model, source=self.source, **contract)
        return self.tokenizer

    def load_data(self, schema, row_check=None):
        """Load, check, mix and split the recipe's datasets with the stage's ``schema``. ``row_check(data, label,
        places)``: the stage's own check of each source's rows, after the chat-template check, so that its errors
        name the file and line (:func:`alignkit.data.places.place`)."""
        from alignkit.data.sources import load_datasets

        stage_check, row_check = row_check, None
        if self.tokenizer is not None or stage_check is not None:

            def row_check(data, label, places):
                if self.tokenizer is not None:  # every chat row renders with the run's template, tools and reasoning
                    from alignkit.data.chat_rows import check_rows

                    check_rows(
                        self.tokenizer, data, label, train_on_reasoning=self.recipe.model.train_on_reasoning,
                        places=places,
                    )  # fmt: skip
                if stage_check is not None:
                    stage_check(data, label, places)

        self.datasets = load_datasets(self.recipe.data, schema, row_check=row_check)
        train = self.datasets.get("train")
        if getattr(schema, "check_split", None) and hasattr(train, "__len__"):  # data that cannot teach: refused here
            schema.check_split(train, "train split")
        logger.info("data: %s", {k: len(v) if hasattr(v, "__len__") else "streamed" for k, v in self.datasets.items()})
        if getattr(self.recipe.train, "assistant_only_loss", False):
            checks.check_assistant_only_loss(self.datasets)
        return self.datasets

    def load_model(self, head: str | None = None, **head_kwargs):
        """Load the backbone with this run's head and the recipe's adapter (the model phase of alignkit.speedups runs
        in the loader). ``head_kwargs``: what the head is built with (num_labels, id2label...). ``head``: only for
        recipes written before ``Run(recipe, stage, head=...)``; it must be the run's."""
        if head is not None and head != self.head:
            raise ConfigError(
                f"load_model({head!r}): this run trains the {self.head} head. Fix: Run(recipe, stage, head={head!r})."
            )
        r = self.recipe
        self.head_config = {k: v for k, v in head_kwargs.items() if isinstance(v, (int, float, str, bool, dict))}
        import transformers

        # the adapter's initial weights come from the seed alone, not from what consumed random numbers since setup
        # (a second run in the same process, data preparation, caches): the same recipe gives the same run
        transformers.set_seed(r.train.seed)
        self.model = load_model(
            r.model,
            r.quant,
            r.adapter,
            self.head,
            gradient_checkpointing=bool(getattr(r.train, "gradient_checkpointing", False)),
            tokenizer=self.tokenizer,
            source=self.source,
            lora_dropout=r.adapter.lora_dropout if "lora_dropout" in r.explicit else None,
            **head_kwargs,
        )
        if self.tokenizer is not None and getattr(self.model.config, "pad_token_id", None) is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        if self.tokenizer is not None and getattr(self.tokenizer, "alignkit_stop_ids", None):
            set_stop_ids(self.model, self.tokenizer)  # generation (GRPO's sampler) stops on the end-of-turn
        self.speedups["model"] = list(getattr(self.model, "alignkit_speedups", []))
        return self.model

    def build_trainer(self, trainer_cls, splits: dict, **kwargs):
        """``trainer_cls`` (a trl or transformers trainer) on the loaded model and tokenizer, the recipe's training
        args, the 'train' split and the 'test' split if there is one; ``kwargs`` are the stage's own (collator,
        metrics).

        A custom template without generation marks whose assistant spans come from rendering
        (:mod:`alignkit.data.chat_spans`) trains through trl's pre-tokenized path: ``input_ids`` + ``assistant_masks``
        rows, from which trl builds the labels (its own ``assistant_only_loss`` switch, which needs marks, is off
        while the trainer is built). The trainer phase of alignkit.speedups is applied to it (not for
        ``label_preview``, which shows one batch as trl's own collator builds it)."""
        from alignkit.data.chat_spans import SOURCE, tokenize_with_rendered_spans

        args = self.recipe.train
        info = getattr(self.tokenizer, "alignkit_template", None)
        rendered = getattr(args, "assistant_only_loss", False) and getattr(info, "source", None) == SOURCE
        if rendered:
            splits = {k: tokenize_with_rendered_spans(v, self.tokenizer, f"{k} split") for k, v in splits.items()}
            args.assistant_only_loss = False
        output_dir, scratch = args.output_dir, None
        if self.recipe.run.label_preview:  # transformers' Trainer creates output_dir: a preview leaves it untouched
            scratch = tempfile.TemporaryDirectory(prefix="alignkit-preview-")
            args.output_dir = scratch.name
        try:
            trainer = trainer_cls(
                model=self.model,
                args=args,
                train_dataset=splits["train"],
                eval_dataset=splits.get("test"),
                processing_class=self.tokenizer,
                **kwargs,
            )
        finally:
            if rendered:
                args.assistant_only_loss = True
            if scratch is not None:
                args.output_dir = output_dir
                scratch.cleanup()
        if not self.recipe.run.label_preview:
            done = [n for phase in ("process", "model") for n in self.speedups.get(phase, [])]
            self.speedups["trainer"] = speedups.apply(
                "trainer", trainer, recipe=self.recipe, stage=self.stage, applied=tuple(done)
            )
            logger.info("speed-ups (alignkit.speedups): %s", self.speedups)
        return trainer

    # ------------------------------------------------------------------ train
    def train(self, trainer, evaluate_before: bool = False) -> dict[str, Any]:
        """Resume if asked, train, evaluate, save outputs and metadata. Returns the final metrics.

        ``evaluate_before``: also evaluate the untrained model first (metrics prefixed ``before_``)."""
        if self.recipe.run.label_preview:
            from alignkit.data.preview import label_preview

            print(label_preview(trainer))
            return {}
        keep = self._prepare(trainer)
        self._write_metadata(status="running")
        if runtime.is_main_process():  # what this run trains with, for a resume to compare against
            (self.output_dir / CONFIG_FILE).write_text(self.recipe.dump())
        evaluate_before = evaluate_before and trainer.eval_dataset is not None
        # evaluate() before train() leaves DeepSpeed without a training engine (transformers#30205, #44889): there the
        # untrained model is evaluated at step 0 inside train() instead.
        trainer.args.eval_on_start = trainer.args.eval_on_start or (evaluate_before and trainer.is_deepspeed_enabled)
        before = (
            trainer.evaluate(metric_key_prefix="before") if evaluate_before and not trainer.is_deepspeed_enabled else {}
        )
        started = time.time()
        stop = SignalStop()
        trainer.add_callback(stop)
        try:
            with stop:  # SIGTERM/SIGINT: finish the step, save a checkpoint, stop
                result = trainer.train(resume_from_checkpoint=self.resume_checkpoint)
        except NonFiniteLossError as exc:
            self._write_metadata(status=f"stopped: {exc.status}")
            raise
        except RewardFunctionError as exc:  # raised inside a step: save the state as of the last finished one
            error = reward_stopped(trainer, exc)
            self._write_metadata(status=f"stopped: {exc.status}")
            raise error from None
        except Exception as exc:
            if not is_disk_full(exc, self.output_dir):
                raise
            raise self._disk_full(trainer, exc) from None
        finally:
            trainer.args.save_total_limit = keep  # the saved config says what the recipe asked
        if stop.signum is not None:
            self._write_metadata(status="interrupted")
            raise stop.error(trainer.state.global_step, self.output_dir)
        if not before and trainer.args.eval_on_start:  # the step-0 evaluation (DeepSpeed, or the recipe's
            # eval_on_start: DPO's reward accuracy of the untrained policy) is the summary's "before" column
            step0 = next((e for e in trainer.state.log_history if e.get("step") == 0 and "eval_loss" in e), {})
            before = {k.replace("eval_", "before_", 1): v for k, v in step0.items()
                      if k.startswith("eval_") and not k.endswith(("runtime", "per_second"))}  # fmt: skip
        trainer.model.eval()  # train() leaves dropout and checkpointing on; generate() is garbage until eval()
        metrics = {**before, **result.metrics}
        if trainer.eval_dataset is not None:
            metrics.update(_final_eval(trainer) or trainer.evaluate())
        metrics["train_wall_seconds"] = round(time.time() - started, 2)
        try:
            self.save(trainer, metrics)
        except Exception as exc:
            if not is_disk_full(exc, self.output_dir):
                raise
            raise self._disk_full(trainer, exc, final=True) from None
        if runtime.is_main_process():
            self._print_summary(metrics, trainer.state.global_step)
        if runtime.launched_distributed():  # every rank got here: meet once more at exit, then shut the groups down
            end_process_group_at_exit()
        if "wandb" in (trainer.args.report_to or []):
            _finish_wandb()  # else the next stage in this process would log into this stage's W&B run
        return metrics

    def _disk_full(self, trainer, exc: Exception, final: bool = False) -> Exception:
        """A save hit a full disk: the one-line error (the partial checkpoint removed), the run record marked."""
        error = disk_full_stop(trainer, self.output_dir, final)
        try:
            self._write_metadata(status=f"stopped: {error.status}")
        except OSError:
            pass  # still no room for the record: the error says what happened
        return error

    def _prepare(self, trainer) -> int | None:
        """The last checks and alignkit's callbacks, before step 1. Returns the recipe's ``save_total_limit``, which
        the trainer gives up meanwhile (alignkit rotates checkpoints itself)."""
        r = self.recipe
        check_trainer_assumptions(trainer, self.stage)  # row order, pairing, one end-of-turn (before the checks)
        from trl import DPOTrainer, KTOTrainer, SFTTrainer

        # SFT drops rows whose trained part lies wholly beyond max_length, DPO/KTO rows whose prompt fills it: truncated
        trims = (SFTTrainer, DPOTrainer, KTOTrainer)
        datasets = (getattr(self, "datasets", None) or {}) if isinstance(trainer, trims) else {}
        rows = {k: v for k, v in datasets.items() if hasattr(v, "__len__")}
        report = getattr(datasets, "alignkit_report", None) or {}
        named = [(e["file"], e["row"]) for e in report.get("prompt_fills_max_length", [])]
        checks.check_trainer(trainer, r.run, {k: len(v) for k, v in rows.items()}, rows, named)
        trainer.add_callback(NonFiniteGuard(enabled=r.run.stop_on_nonfinite))
        if rewards := [f for f in getattr(trainer, "reward_funcs", None) or [] if isinstance(f, CheckedReward)]:
            RewardCounts(rewards).install(trainer)  # skipped / non-finite rewards per function, in every log
        # alignkit rotates checkpoints itself, after the new one is marked complete: transformers deletes the old
        # ones before that, so a kill in between would leave nothing to resume from
        keep, trainer.args.save_total_limit = trainer.args.save_total_limit, None
        trainer.add_callback(AtomicCheckpoints(save_total_limit=keep))
        if (debug_log := debug_callback(self.output_dir)) is not None:
            trainer.add_callback(debug_log)
        if "wandb" in (trainer.args.report_to or []):
            trainer.add_callback(ResolvedConfigToWandb(r.resolved()))
        check_shared_output_dir(self.output_dir)  # every node writes into the same folder
        if runtime.is_main_process():
            logger.info(resume.describe_launch(trainer.args))
        if self.resume_universal and trainer.is_deepspeed_enabled:
            # DeepSpeed reads checkpoint.load_universal when train() builds the engine from this (propagated) config
            ds_config = trainer.accelerator.state.deepspeed_plugin.hf_ds_config.config
            ds_config.setdefault("checkpoint", {})["load_universal"] = True
        return keep

    def _print_summary(self, metrics: dict[str, Any], steps: int) -> None:
        """The closing summary on the console (alignkit.train.summary): metrics before/after, outputs, next steps."""
        from alignkit.models.heads import HEADS
        from alignkit.train.summary import run_summary

        head = HEADS.get(self.head)
        print(
            run_summary(
                self.stage, self.head, metrics, self.output_dir, adapter=bool(self.recipe.adapter.use_peft),
                pipeline_task=head.pipeline if head else None, steps=steps, new_head=bool(head and head.new),
                auto_class=head.auto_class if head else None, inference=self.inference,
                data=getattr(getattr(self, "datasets", None), "alignkit_report", None),
            ),
            flush=True,
        )  # fmt: skip

    def save(self, trainer, metrics: dict[str, Any]) -> None:
        trainer.save_model(str(self.output_dir))
        if not runtime.is_main_process():
            return
        (self.output_dir / PICKLED_ARGS).unlink(missing_ok=True)
        if self.tokenizer is not None:
            from alignkit.data.chat_families import save_tokenizer

            save_tokenizer(self.tokenizer, self.output_dir, getattr(trainer, "model", None))
        trainer.state.save_to_json(str(self.output_dir / "trainer_state.json"))
        (self.output_dir / CONFIG_FILE).write_text(self.recipe.dump())
        self._write_metadata(status="finished", metrics=metrics)
        if self.recipe.run.overwrite_output_dir:  # the replaced run's (also when this resumes the overwriting run)
            drop_replaced_checkpoints(self.output_dir)
        from alignkit.export.card import write_model_card

        write_model_card(self.output_dir)
        if self.hub_repo:
            from alignkit.export.hub import push_folder

            push_folder(self.output_dir, self.hub_repo, private=self.recipe.train.hub_private_repo)

    def _write_metadata(self, status: str, metrics: dict[str, Any] | None = None) -> None:
        if not runtime.is_main_process():
            return
        from alignkit.data.sources import describe_source

        r, parent = self.recipe, self.source.parent_run
        entry = LineageEntry(
            stage=self.stage,
            output_dir=str(self.output_dir),
            task=self.head,
            head_config=self.head_config,
            inference=self.inference,
            datasets=[describe_source(s) for s in r.data.datasets],
            data=getattr(getattr(self, "datasets", None), "alignkit_report", None) or {},
            adapter_handoff=r.model.adapter_handoff if self.source.adapter_dir else None,
            from_adapter=self.source.adapter_dir,
            from_stage=parent.stage if parent else None,
            quantization="4-bit " + r.quant.bnb_4bit_quant_type if r.quant.load_in_4bit else None,
            adapter="lora" if r.adapter.use_peft else None,
            config=r.resolved(),
            chat_template=_chat_template_entry(self.tokenizer),
            speedups={phase: names for phase, names in self.speedups.items() if names},
            precision=getattr(self, "precision", {}),
            memory_plan=getattr(self, "memory_plan", {}),
        )
        # The base the new adapter sits on: an earlier adapter's base as that run named it (GGUF, tiny:) when this
        # stage continues or stacks on its adapter; else the model this stage loaded: a merged or full run folder is
        # itself the base (its own record names the base *it* was trained from, without the weights merged into it).
        continues = self.source.adapter_dir and parent and parent.base_model_args.model_name_or_path
        base = parent.base_model_args if continues else BaseModelRef(r.model.model_name_or_path, r.model.gguf_file)
        loaded = getattr(self.model, "alignkit_source", None)
        if entry.adapter_handoff == "merge" and loaded:  # the new adapter belongs to the merged base the loader wrote
            base = BaseModelRef(loaded.base)
        RunRecord(
            stage=self.stage,
            status=status,
            base_model_args=base,
            lineage=[*self.source.lineage, entry],
            metrics=metrics or {},
            alignkit_version=alignkit_version(),
        ).write(self.output_dir)


def _chat_template_entry(tokenizer) -> dict | None:
    info = getattr(tokenizer, "alignkit_template", None)
    return {"family": info.family, "source": info.source} if info is not None else None


def _final_eval(trainer) -> dict[str, Any] | None:
    """The eval metrics the trainer already logged at its last step, when they score the final model (eval_steps
    dividing max_steps, or an epoch-end eval): evaluating again would repeat the same evaluation. None when there is
    none, or when ``load_best_model_at_end`` swapped in another checkpoint."""
    state = trainer.state
    if trainer.args.load_best_model_at_end or not state.log_history:
        return None
    for entry in reversed(state.log_history):
        if entry.get("step") != state.global_step:
            break
        if "eval_loss" in entry or any(k.startswith("eval_") and not k.endswith("runtime") for k in entry):
            logger.info(
                "final evaluation: reusing the evaluation logged at step %d (the same model)", state.global_step
            )
            return {k: v for k, v in entry.items() if k.startswith("eval_")}
    return None


def _finish_wandb() -> None:
    import wandb

    if wandb.run is not None:
        wandb.finish()
    wandb.teardown()  # W&B reads WANDB_RUN_GROUP once per setup; the next stage in this process sets its own
