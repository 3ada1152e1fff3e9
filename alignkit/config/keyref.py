"""The key reference: every recipe key of every stage with its group, type, default and help, and ``--help`` built
from it.

``alignkit <stage> --help`` must answer in well under 2 s, and importing the stage configs (trl, transformers, torch)
takes 10 s or more. So the reference is generated once from the config dataclasses (:func:`key_rows`, written by
``python scripts/write_key_reference.py`` into ``keys.json`` beside this module and into ``docs/keys.md``), checked
in CI against the live dataclasses (tests/structure/test_key_reference.py), and read back with nothing but ``json``.
``python recipes/<stage>.py --help`` renders the same text from the live classes.

``--help`` lists alignkit's own keys and the upstream keys a recipe commonly sets (:data:`COMMON_UPSTREAM`);
``--help-all`` lists every key. A key two groups share (``trust_remote_code``, ``dataset_num_proc``) is listed once,
with the first group's help and the other groups named.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import textwrap
import typing
from pathlib import Path
from typing import Any

KEYS_JSON = Path(__file__).with_name("keys.json")

# Upstream (trl / transformers) keys a recipe commonly sets: shown by --help beside alignkit's own keys. The rest of
# the upstream keys (over a hundred: --do_predict, --local_rank, ...) are listed by --help-all.
COMMON_UPSTREAM: dict[str, tuple[str, ...]] = {
    "*": (
        "output_dir", "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
        "gradient_accumulation_steps", "lr_scheduler_type", "warmup_steps", "logging_steps", "save_steps",
        "eval_steps", "report_to", "resume_from_checkpoint", "seed",
    ),
    "cpt": (),
    "sft": ("max_length", "packing", "assistant_only_loss"),
    "dpo": ("beta", "loss_type", "max_length"),
    "kto": ("beta", "desirable_weight", "undesirable_weight", "max_length"),
    "orpo": ("beta", "max_length"),
    "simpo": ("simpo_gamma", "max_length"),
    "reward": ("max_length", "center_rewards_coefficient"),
    "grpo": ("num_generations", "max_completion_length", "temperature", "beta", "loss_type", "importance_sampling_level"),
    "rloo": ("num_generations", "max_completion_length", "temperature", "beta"),
    "online_dpo": ("max_new_tokens", "max_length", "temperature", "beta", "loss_type", "missing_eos_penalty"),
    "distill": ("teacher_model_name_or_path", "max_completion_length", "temperature", "beta"),
    "embed": (),
    "task": ("predict_with_generate",),
}  # fmt: skip

# Upstream keys whose meaning alignkit extends: this help replaces upstream's.
HELP = {
    "resume_from_checkpoint": "true: go on from the newest complete checkpoint in output_dir (its optimizer, schedule "
    "and data position); or the path of one checkpoint folder. A changed recipe is refused with the keys that changed.",
}

# alignkit's own keys that few recipes set: listed by --help-all only, so that --help stays under 60 options.
ADVANCED = (
    "gguf_file", "revision", "allow_pickle_weights", "from_scratch", "config_overrides", "streaming_shuffle_buffer",
    "streaming_check_rows", "min_free_disk_gb", "mixture_seed", "max_eval_samples", "use_liger_kernel",
    "gradient_checkpointing", "max_bad_rows", "nonfinite_rewards", "bnb_4bit_quant_storage", "wandb_group",
    "numeric_tolerance", "tool_timeout",
    # task heads (alignkit/tasks/): the tuning knobs; --help keeps each head's data columns and labels
    "whole_word_masking", "mlm_probability", "doc_stride", "n_best_size", "max_answer_length",
    "null_score_diff_threshold", "source_prefix", "max_target_length", "text_pair_column", "label_all_tokens",
)  # fmt: skip

# The parser's own flags (not keys of any group), shown first.
PARSER_FLAGS = (
    ("--config RECIPE.yaml", "The recipe: flat YAML of key: value (alignkit recipes lists the shipped ones)."),
    ("--print_config", "Print the resolved recipe (every group, every default) and exit."),
    ("--help-all", "List every key, upstream ones included."),
)


def _type_name(hint: Any) -> str:
    text = hint if isinstance(hint, str) else getattr(hint, "__name__", None) or repr(hint)
    text = re.sub(r"\b(typing|transformers\.[\w.]+|trl\.[\w.]+|enum)\.", "", str(text))
    return text.replace("NoneType", "None").replace("Optional[", "").replace("<class '", "").replace("'>", "")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        try:
            value = f.default_factory()
        except Exception:  # a factory that needs the environment: say so instead
            return "(computed)"
    else:
        return "(required)"
    if hasattr(value, "value") and hasattr(type(value), "__members__"):
        value = value.value  # enums
    try:
        json.dumps(value)
    except TypeError:
        value = str(value)
    return value


def _upstream_help(cls: type, name: str) -> str:
    """The help of field ``name`` in the nearest base that gives one: alignkit re-declares some upstream fields only to
    change their default (``output_dir``, ``logging_steps``, ``report_to``), and upstream documents a few fields only
    in the class docstring (``name (`type`, ...):`` and the lines indented under it)."""
    for klass in cls.__mro__[1:]:
        f = getattr(klass, "__dataclass_fields__", {}).get(name)
        if f is not None and f.metadata.get("help"):
            return str(f.metadata["help"])
    for klass in cls.__mro__:
        lines = inspect.cleandoc(klass.__dict__.get("__doc__") or "").splitlines()
        for i, line in enumerate(lines):
            if re.match(rf"\s*{re.escape(name)}\s*\(`", line):
                indent = len(line) - len(line.lstrip())
                body = []
                for more in lines[i + 1 :]:
                    if more.strip() and len(more) - len(more.lstrip()) <= indent:
                        break
                    body.append(more.strip())
                return " ".join(b for b in body if b)
    return ""


def _owner_module(cls: type, name: str) -> str:
    """The module of the class that declares field ``name`` (alignkit's subclass, or the upstream base)."""
    for klass in cls.__mro__:
        if name in klass.__dict__.get("__annotations__", {}):
            return klass.__module__
    return cls.__module__


def key_rows(groups: tuple[type, ...], stage: str = "*") -> list[dict[str, Any]]:
    """One row per recipe key of the groups (a recipe's dataclasses, in parser order), each key once:
    ``{"key", "group", "also", "type", "default", "help", "alignkit", "common"}``. ``alignkit``: declared by
    alignkit (its own groups, or its subclass of an upstream config); ``common``: shown by ``--help``."""
    common = set(COMMON_UPSTREAM["*"]) | set(COMMON_UPSTREAM.get(stage, ()))
    rows: dict[str, dict[str, Any]] = {}
    for cls in groups:
        try:
            hints = typing.get_type_hints(cls)
        except Exception:
            hints = {}
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            if f.name in rows:
                rows[f.name]["also"].append(cls.__name__)
                continue
            help_ = " ".join(
                (HELP.get(f.name) or str(f.metadata.get("help", "")) or _upstream_help(cls, f.name)).split()
            )
            own = _owner_module(cls, f.name).startswith("alignkit")
            rows[f.name] = {
                "key": f.name,
                "group": cls.__name__,
                "also": [],
                "type": _type_name(hints.get(f.name, f.type)),
                "default": _default(f),
                "help": help_.replace("%%", "%"),
                "alignkit": own,
                "common": (own and f.name not in ADVANCED) or f.name in common,
            }
    return list(rows.values())


def _show(value: Any) -> str:
    return value if isinstance(value, str) and value.startswith("(") else json.dumps(value)


def render_help(stage: str, rows: list[dict[str, Any]], every_key: bool = False, width: int = 118) -> str:
    """The text of ``alignkit <stage> --help`` (``every_key``: ``--help-all``): usage, the parser's flags, then the
    keys by group, each with its type, default and help."""
    shown = [r for r in rows if every_key or r["common"]]
    lines = [
        f"usage: alignkit {stage} --config RECIPE.yaml [--key value ...] [--print_config]",
        f"   or: accelerate launch [launcher options] recipes/{stage}.py --config RECIPE.yaml [--key value ...]",
        "",
        "A --key value on the command line overrides the recipe's key. "
        + (
            f"All {len(rows)} keys:"
            if every_key
            else f"{len(shown)} of {len(rows)} keys: alignkit's own and the upstream ones recipes commonly set "
            "(--help-all: every key)."
        ),
        "",
    ]
    lines += [f"  {flag:<22} {text}" for flag, text in PARSER_FLAGS]
    group = None
    wrap = textwrap.TextWrapper(width=width, initial_indent="      ", subsequent_indent="      ")
    for r in shown:
        if r["group"] != group:
            group = r["group"]
            lines += ["", f"{group}:"]
        also = f" (also {', '.join(r['also'])})" if r["also"] else ""
        lines.append(f"  --{r['key']} {r['type']}  default: {_show(r['default'])}{also}")
        if r["help"]:
            lines += wrap.wrap(r["help"])
    return "\n".join(lines) + "\n"


def load_reference() -> dict[str, list[dict[str, Any]]]:
    """The checked-in reference, ``{stage: rows}`` (reads one JSON file; imports nothing heavy)."""
    return json.loads(KEYS_JSON.read_text(encoding="utf-8"))


def render_markdown(reference: dict[str, list[dict[str, Any]]]) -> str:
    """docs/keys.md: the keys every stage shares with the same type, default and help in one table, then per stage
    the keys that are its own or differ."""

    def same(r):
        return (r["key"], r["type"], json.dumps(r["default"]), r["help"], r["common"])

    stages = list(reference)
    shared = set.intersection(*({same(r) for r in rows} for rows in reference.values()))
    out = [
        "# Key reference",
        "",
        "[Back to the docs index](README.md). Generated from the config dataclasses by "
        "`python scripts/write_key_reference.py`; a test checks it against them. **Bold**: alignkit's own keys and "
        "the upstream keys `alignkit <stage> --help` shows; the others are listed by `--help-all`. A group named "
        "`<Stage>Config` is the stage's trainer config (trl's or transformers' class with alignkit's defaults).",
        "",
    ]

    def table(rows, group_of):
        lines = ["| key | group | type | default | help |", "|---|---|---|---|---|"]
        for r in rows:
            key = f"**`{r['key']}`**" if r["common"] else f"`{r['key']}`"
            cells = [key, group_of(r), f"`{r['type']}`", f"`{_show(r['default'])}`", r["help"]]
            lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
        return lines

    first = reference[stages[0]]
    out += [f"## Every stage ({', '.join(stages)})", ""]
    out += table([r for r in first if same(r) in shared],
                 lambda r: r["group"] if r["group"].endswith("Arguments") else "`<Stage>Config`")  # fmt: skip
    for stage, rows in reference.items():
        out += ["", f"## {stage}", ""]
        out += table([r for r in rows if same(r) not in shared], lambda r: r["group"])
    return "\n".join(out) + "\n"


def write_reference(reference: dict[str, list[dict[str, Any]]], docs_dir: Path | None = None) -> None:
    """Write ``keys.json`` (read by ``--help``) and, given ``docs_dir``, ``docs_dir/keys.md``."""
    stages = [
        f"{json.dumps(stage)}: [\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n]"
        for stage, rows in reference.items()
    ]  # one key a line: a changed key is a one-line diff
    KEYS_JSON.write_text("{\n" + ",\n".join(stages) + "\n}\n", encoding="utf-8")
    if docs_dir is not None:
        (Path(docs_dir) / "keys.md").write_text(render_markdown(reference), encoding="utf-8")
