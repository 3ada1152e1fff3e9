"""The one run loop every recipe uses: setup (seed, preflight) -> build (tokenizer, data, model) -> train -> save.

A recipe script keeps only what is specific to its stage (which trainer, which schema) and hands the rest here.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from alignkit.config import Recipe
from alignkit.errors import PreflightError
from alignkit.models.loader import RUN_METADATA, adapter_dtype_fix, load_model, resolve_dtype, resolve_source
from alignkit.models.tokenizer import load_tokenizer
from alignkit.train.callbacks import NonFiniteGuard, ResolvedConfigToWandb

logger = logging.getLogger("alignkit")

CONFIG_FILE = "alignkit_config.yaml"


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


class Run:
    """One stage's run. Construct it with the parsed recipe and the stage name, then call its steps in order."""

    def __init__(self, recipe: Recipe, stage: str):
        self.recipe, self.stage = recipe, stage
        self.output_dir = Path(recipe.train.output_dir)
        self.source = resolve_source(recipe.model)
        self.tokenizer = None
        self.model = None
        self._setup()

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        import transformers

        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO, stream=sys.stdout)
        transformers.set_seed(self.recipe.train.seed)
        self._preflight_output_dir()
        self._setup_tracking()

    def _preflight_output_dir(self) -> None:
        out, run = self.output_dir, self.recipe.run
        resume = self.recipe.train.resume_from_checkpoint
        meta = out / RUN_METADATA
        if meta.is_file() and not run.overwrite_output_dir and not resume and not run.label_preview:
            status = json.loads(meta.read_text()).get("status")
            if status == "finished":
                raise PreflightError(
                    f"{out}: holds a finished {json.loads(meta.read_text()).get('stage')} run. Fix: choose another "
                    "output_dir, or set overwrite_output_dir: true to replace it."
                )
        if not resume and not run.overwrite_output_dir and any(out.glob("checkpoint-*")) and not run.label_preview:
            raise PreflightError(
                f"{out}: holds checkpoints of an unfinished run. Fix: set resume_from_checkpoint: true to continue it, "
                "or overwrite_output_dir: true to start over."
            )
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".alignkit_write_probe"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise PreflightError(f"{out}: output_dir is not writable ({exc.strerror}). Fix: choose a writable output_dir.") from exc
        free_gb = shutil.disk_usage(out).free / 2**30
        if free_gb < run.min_free_disk_gb:
            raise PreflightError(
                f"{out}: only {free_gb:.1f} GiB free, below min_free_disk_gb={run.min_free_disk_gb}. Fix: free disk space "
                "or choose another output_dir."
            )

    def _setup_tracking(self) -> None:
        report_to = self.recipe.train.report_to or []
        if "wandb" in (report_to if isinstance(report_to, list) else [report_to]):
            os.environ.setdefault("WANDB_PROJECT", "alignkit")
            os.environ.setdefault("WANDB_RUN_GROUP", self.recipe.run.wandb_group or self.stage)
            if not self.recipe.train.run_name or self.recipe.train.run_name == self.recipe.train.output_dir:
                self.recipe.train.run_name = f"{self.stage}-{self.output_dir.name}"

    # ------------------------------------------------------------------ build
    def load_tokenizer(self, **contract):
        """Load the tokenizer through the contract (see :func:`alignkit.models.tokenizer.apply_contract`)."""
        self.tokenizer = load_tokenizer(self.recipe.model, source=self.source, **contract)
        return self.tokenizer

    def load_data(self, schema):
        from alignkit.data.sources import load_datasets

        self.datasets = load_datasets(self.recipe.data, schema)
        logger.info("data: %s", {k: len(v) for k, v in self.datasets.items()})
        return self.datasets

    def load_model(self, task: str | None = None, **head_kwargs):
        r = self.recipe
        task = task or r.run.task
        self.model = load_model(
            r.model, r.quant, r.adapter, task,
            gradient_checkpointing=bool(getattr(r.train, "gradient_checkpointing", False)),
            tokenizer=self.tokenizer, source=self.source, **head_kwargs,
        )
        if self.tokenizer is not None and getattr(self.model.config, "pad_token_id", None) is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        return self.model

    # ------------------------------------------------------------------ train
    def train(self, trainer) -> dict[str, Any]:
        """Resume if asked, train, evaluate, save outputs and metadata. Returns the final metrics."""
        r = self.recipe
        if r.quant.load_in_4bit:
            adapter_dtype_fix(trainer.model, resolve_dtype(r.quant.bnb_4bit_compute_dtype))
        if r.run.label_preview:
            from alignkit.data.preview import label_preview

            print(label_preview(trainer))
            return {}
        trainer.add_callback(NonFiniteGuard(enabled=r.run.stop_on_nonfinite))
        if "wandb" in (trainer.args.report_to or []):
            trainer.add_callback(ResolvedConfigToWandb(r.resolved()))
        self._write_metadata(status="running")
        started = time.time()
        result = trainer.train(resume_from_checkpoint=self._resume_path())
        trainer.model.eval()  # train() leaves dropout and checkpointing on; generate() is garbage until eval()
        metrics = dict(result.metrics)
        if trainer.eval_dataset is not None:
            metrics.update(trainer.evaluate())
        metrics["train_wall_seconds"] = round(time.time() - started, 2)
        self.save(trainer, metrics)
        return metrics

    def _resume_path(self) -> str | None:
        resume = self.recipe.train.resume_from_checkpoint
        if resume in (None, "", "false", "False"):
            return None
        if str(resume).lower() in ("true", "latest"):
            from transformers.trainer_utils import get_last_checkpoint

            last = get_last_checkpoint(str(self.output_dir)) if self.output_dir.is_dir() else None
            if last is None:
                raise PreflightError(f"{self.output_dir}: resume_from_checkpoint: true, but no checkpoint-* folder is there.")
            return last
        if not Path(resume).is_dir():
            raise PreflightError(f"resume_from_checkpoint: {resume} is not a checkpoint folder.")
        return str(resume)

    def save(self, trainer, metrics: dict[str, Any]) -> None:
        trainer.save_model(str(self.output_dir))
        if not _is_main_process():
            return
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(self.output_dir))
        trainer.state.save_to_json(str(self.output_dir / "trainer_state.json"))
        (self.output_dir / CONFIG_FILE).write_text(self.recipe.dump())
        self._write_metadata(status="finished", metrics=metrics)
        from alignkit.export.card import write_model_card

        write_model_card(self.output_dir)

    def _write_metadata(self, status: str, metrics: dict[str, Any] | None = None) -> None:
        if not _is_main_process():
            return
        r = self.recipe
        entry = {
            "stage": self.stage,
            "output_dir": str(self.output_dir),
            "task": r.run.task,
            "datasets": [{"path": s.path, "weight": s.weight, "split": s.split} for s in r.data.datasets],
            "adapter_handoff": r.model.adapter_handoff if self.source.adapter_dir else None,
            "from_adapter": self.source.adapter_dir,
            "quantization": "4-bit " + r.quant.bnb_4bit_quant_type if r.quant.load_in_4bit else None,
            "adapter": "lora" if r.adapter.use_peft else None,
            "config": r.resolved(),
        }
        base_args = (self.source.parent_run or {}).get("base_model_args") or {
            "model_name_or_path": r.model.model_name_or_path,
            "gguf_file": r.model.gguf_file,
        }
        meta = {
            "alignkit_version": _version(),
            "status": status,
            "stage": self.stage,
            "base_model_args": base_args,
            "lineage": [*self.source.lineage, entry],
            "metrics": _finite(metrics or {}),
        }
        path = self.output_dir / RUN_METADATA
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta, indent=2, default=str))
        tmp.replace(path)


def _finite(metrics: dict[str, Any]) -> dict[str, Any]:
    import math

    return {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in metrics.items()}


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("alignkit")
    except Exception:
        return "unknown"
