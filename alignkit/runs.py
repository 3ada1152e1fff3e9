"""The run record, ``alignkit_run.json``: what a stage (or a merge) wrote into its output dir, typed and versioned.
Every reader and writer goes through :class:`RunRecord`; nothing else opens the file or knows its keys.

A record says the run's status (``running``, ``finished``, ``stopped: ...``), the stage, the base model as the first
stage loaded it, the final metrics and the lineage: one :class:`LineageEntry` per stage that led to this output,
oldest first, each with its resolved config grouped by section (so the next stage can rebuild the exact
``QuantizationArguments`` an adapter was trained with, say). ``format`` is bumped whenever a field changes meaning; a
record of a newer format than this alignkit reads is refused with the fix instead of misread.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from alignkit.errors import ConfigError

FILE = "alignkit_run.json"
CHECKPOINT = "checkpoint"  # the status of a checkpoint-N folder's record (RunRecord.for_model)
_CHECKPOINT_NAME = re.compile(r"checkpoint-\d+")  # transformers' PREFIX_CHECKPOINT_DIR-<global step>
FORMAT = 1
G = TypeVar("G")


@dataclass
class BaseModelRef:
    """The backbone as the first stage named it (a Hub id, a .gguf file, ``tiny:llama``...), or after a ``merge``
    hand-off the merged base the loader wrote."""

    model_name_or_path: str | None = None
    gguf_file: str | None = None


@dataclass
class MergeInfo:
    """What ``alignkit merge`` did and the parity it measured (max |logit difference| vs base + adapter)."""

    method: str
    max_abs_logit_diff: float
    max_logit_diff_bound: float
    parity_passed: bool
    loss_base_plus_adapter: float | None  # None: a task head (its logits compared, no loss on the prompts)
    loss_merged: float | None
    loss_delta: float | None


@dataclass
class LineageEntry:
    """One stage of the lineage. ``config`` is the stage's resolved config, ``{group name: {key: value}}``."""

    stage: str
    output_dir: str | None = None
    task: str | None = None  # the model head: causal_lm, seq_cls, token_cls, qa, mlm, seq2seq
    head_config: dict[str, Any] = field(default_factory=dict)  # what the head was built with, e.g. {num_labels: 1}
    # how the trained model is used, as it was trained and scored (alignkit.tasks: Task.inference): token_cls
    # {aggregation_strategy: first}, qa {max_length, doc_stride, n_best_size, max_answer_length, ...}
    inference: dict[str, Any] = field(default_factory=dict)
    datasets: list[dict[str, Any]] = field(default_factory=list)  # {path, weight, split}
    # what loading the data found: {held_out: {sources, rows, also_in_train}, skipped_rows: n, skipped: [{file, row,
    # problem}] (on_bad_rows: skip; the first 20), prompt_fills_max_length: [{file, row}] (DPO/KTO rows trl drops: the
    # first 20), prompt_fills_max_length_rows: n}
    data: dict[str, Any] = field(default_factory=dict)
    adapter_handoff: str | None = None  # how this stage used from_adapter: continue | reference | merge
    from_adapter: str | None = None  # the earlier stage's adapter (a merge: the adapter merged)
    from_stage: str | None = None
    quantization: str | None = None  # e.g. "4-bit nf4"
    adapter: str | None = None  # "lora", or None for full fine-tuning
    config: dict[str, dict[str, Any]] = field(default_factory=dict)
    speedups: dict[str, list[str]] = field(default_factory=dict)  # what alignkit.speedups applied, by phase
    merge: MergeInfo | None = None  # only on a merge entry
    # the chat format trained: {family, source (stock | twin | installed ...)}; family None: a custom template
    chat_template: dict[str, Any] | None = None
    # the precision the run trained in: {weights, mixed_precision (bf16 | fp16 | no), bnb_4bit_compute (4-bit only),
    # why, cpu {model, bf16_units, isa, isa_env, threads}, probe {n, float32_gflops, bfloat16_gflops, speedup}}
    precision: dict[str, Any] = field(default_factory=dict)
    # the memory plan made before the model loaded (alignkit.train.plan): {device, predicted_peak_mib, capacity_mib,
    # fits, parts_mib, tokens_per_s}
    memory_plan: dict[str, Any] = field(default_factory=dict)

    def group(self, cls: type[G], **overrides) -> G:
        """The config group ``cls`` (e.g. ``QuantizationArguments``) as this stage resolved it; keys ``cls`` does
        not know are left out, missing ones take ``cls``'s defaults."""
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        values = {k: v for k, v in self.config.get(cls.__name__, {}).items() if k in names}
        return cls(**{**values, **overrides})

    def settings(self) -> dict[str, Any]:
        """Every resolved key of this stage, flat (the groups merged)."""
        return {k: v for group in self.config.values() for k, v in group.items()}

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "merge"}
        if self.merge is not None:  # a merge entry: its fields next to the stage's, as in the summary below
            data = {k: v for k, v in data.items() if v not in (None, [], {})}
            data.update(dataclasses.asdict(self.merge))
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LineageEntry:
        merge_names = {f.name for f in dataclasses.fields(MergeInfo)}
        merge = MergeInfo(**{k: data[k] for k in merge_names}) if merge_names <= set(data) else None
        names = {f.name for f in dataclasses.fields(cls)} - {"merge"}
        return cls(**{k: v for k, v in data.items() if k in names}, merge=merge)


@dataclass
class RunRecord:
    """The content of ``alignkit_run.json``. Read it with :meth:`read`, write it with :meth:`write` (atomic)."""

    stage: str
    status: str = "running"
    base_model_args: BaseModelRef = field(default_factory=BaseModelRef)
    lineage: list[LineageEntry] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    merge: MergeInfo | None = None  # set on a merged model: the last merge's parity
    exports: list[dict[str, Any]] = field(default_factory=list)  # GGUF files written from it, with their parity
    alignkit_version: str = "unknown"
    format: int = FORMAT

    @property
    def last(self) -> LineageEntry | None:
        """The stage that wrote this output."""
        return self.lineage[-1] if self.lineage else None

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @property
    def usable(self) -> bool:
        """True when the folder holds a whole model: a finished run, or a checkpoint of one (:meth:`for_model`)."""
        return self.status in ("finished", CHECKPOINT)

    # ---------------------------------------------------------------- file
    @staticmethod
    def path(folder: str | Path) -> Path:
        return Path(folder) / FILE

    @classmethod
    def exists(cls, folder: str | Path) -> bool:
        return cls.path(folder).is_file()

    @classmethod
    def read(cls, folder: str | Path) -> RunRecord | None:
        """The record in ``folder``, or None if there is none. Raises ConfigError for an unreadable file or a format
        newer than this alignkit knows."""
        path = cls.path(folder)
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"{path}: not a readable run record ({exc}). Fix: rerun the stage that wrote {Path(folder)}."
            ) from exc
        return cls.from_json(data, source=str(path))

    @classmethod
    def for_model(cls, folder: str | Path) -> RunRecord | None:
        """The record that describes the model in ``folder``: its own ``alignkit_run.json``; for a ``checkpoint-N``
        folder without one (what transformers' Trainer saves inside a run's output dir), the record of that run, with
        status ``checkpoint`` and no metrics (the checkpoint is that run's model at step N: the same base,
        quantization, head and chat template, not its final figures); else None. Every reader that loads, merges or
        describes a trained model reads this, so a checkpoint is not taken for a bare PEFT folder (whose base would
        load in full precision, not as the 4-bit base it was trained on). Raises ConfigError as :meth:`read`."""
        folder = Path(folder)
        own = cls.read(folder)
        if own is not None or not _CHECKPOINT_NAME.fullmatch(folder.name) or not folder.is_dir():
            return own
        run = cls.read(folder.parent)
        return None if run is None else dataclasses.replace(run, status=CHECKPOINT, metrics={}, exports=[])

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = FILE) -> RunRecord:
        version = data.get("format", FORMAT)  # records written before the field existed have format 1's layout
        if not isinstance(version, int) or version > FORMAT or version < 1:
            raise ConfigError(
                f"{source}: run record format {version!r}, but this alignkit reads format {FORMAT}. Fix: upgrade "
                "alignkit to the version that wrote it, or rerun the stage with this one."
            )
        merge = data.get("merge")
        return cls(
            stage=data.get("stage", "unknown"),
            status=data.get("status", "unknown"),
            base_model_args=BaseModelRef(**(data.get("base_model_args") or {})),
            lineage=[LineageEntry.from_json(e) for e in data.get("lineage", [])],
            metrics=dict(data.get("metrics") or {}),
            merge=MergeInfo(**{k: v for k, v in merge.items() if k != "from_adapter"}) if merge else None,
            exports=list(data.get("exports") or []),
            alignkit_version=data.get("alignkit_version", "unknown"),
        )

    def to_json(self) -> dict[str, Any]:
        data = {
            "format": self.format,
            "alignkit_version": self.alignkit_version,
            "status": self.status,
            "stage": self.stage,
            "base_model_args": dataclasses.asdict(self.base_model_args),
            "lineage": [e.to_json() for e in self.lineage],
            "metrics": _finite(self.metrics),
        }
        if self.merge is not None:
            data["merge"] = {**dataclasses.asdict(self.merge), "from_adapter": self.last and self.last.from_adapter}
        if self.exports:
            data["exports"] = self.exports
        return data

    def write(self, folder: str | Path) -> Path:
        """Write atomically (a reader never sees half a file)."""
        path = self.path(folder)
        tmp = path.with_name(f"{FILE}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.to_json(), indent=2, default=str))
        tmp.replace(path)
        return path


def _finite(metrics: dict[str, Any]) -> dict[str, Any]:
    """NaN/Inf as strings: JSON has no such numbers."""
    import math

    return {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in metrics.items()}


def alignkit_version() -> str:
    try:
        from importlib.metadata import version

        return version("alignkit")
    except Exception:
        return "unknown"
