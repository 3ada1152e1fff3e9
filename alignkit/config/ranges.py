"""Range checks for every numeric key a recipe sets: alignkit's and the upstream ones (transformers'
TrainingArguments, trl's SFTConfig / DPOConfig, peft's LoRA settings) that the recipes pass through. Each row is the
key, the rule, and a value that would do; a value that breaks the rule stops the recipe before any model loads,
with the key, the value and the fix.

Sources of the rules: what the upstream code divides by, indexes with or feeds to a sampler (a batch size of 0, a
``save_steps`` of 0, a dropout of 1.5 fail there with raw errors), and what trains silently wrong (a learning rate or
``lora_alpha`` of 0 trains nothing; ``max_steps: 0`` still takes a step; DPO's ``beta`` must be positive).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from alignkit.errors import ConfigError


@dataclass(frozen=True)
class Rule:
    text: str  # what a valid value is, as the message says it
    ok: Callable[[Any], bool]
    example: str  # a value that would do


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


POSITIVE = Rule("a number > 0", lambda x: _num(x) and x > 0, "2e-4")
POSITIVE_INT = Rule("a whole number >= 1", lambda x: _int(x) and x >= 1, "8")
NON_NEGATIVE = Rule("a number >= 0", lambda x: _num(x) and x >= 0, "0.0")
NON_NEGATIVE_INT = Rule("a whole number >= 0", lambda x: _int(x) and x >= 0, "0")
FRACTION = Rule("a number in [0, 1)", lambda x: _num(x) and 0 <= x < 1, "0.05")
UNIT = Rule("a number in [0, 1]", lambda x: _num(x) and 0 <= x <= 1, "0.1")
STEPS = Rule("-1 (train num_train_epochs) or a whole number >= 1", lambda x: _int(x) and (x == -1 or x >= 1), "100")
EVERY = Rule("a whole number >= 1, or a fraction in (0, 1) of the total steps", lambda x: _num(x) and x > 0 and (x < 1 or float(x).is_integer()), "500")  # fmt: skip
# null: sentence-transformers' default (transformers 5 folds a ratio into warmup_steps)
OPTIONAL_UNIT = Rule("null or a number in [0, 1]", lambda x: x is None or (_num(x) and 0 <= x <= 1), "0.1")
OPTIONAL_POSITIVE_INT = Rule("null or a whole number >= 1", lambda x: x is None or (_int(x) and x >= 1), "512")
# POSITIVE's example is a learning rate; these keys are > 0 too, with an example of their own
WEIGHT = Rule(POSITIVE.text, POSITIVE.ok, "1.0")
TEMPERATURE = Rule(POSITIVE.text, POSITIVE.ok, "1.0")

# key -> rule. A key absent from a recipe's groups is skipped (every stage has its own subset).
RANGES: dict[str, Rule] = {
    # optimisation
    "learning_rate": POSITIVE,
    "weight_decay": NON_NEGATIVE,
    "max_grad_norm": NON_NEGATIVE,
    "adam_beta1": FRACTION,
    "adam_beta2": FRACTION,
    "adam_epsilon": POSITIVE,
    "warmup_ratio": OPTIONAL_UNIT,
    "warmup_steps": NON_NEGATIVE,
    # length of the run and its batches
    "max_steps": STEPS,
    "num_train_epochs": Rule(POSITIVE.text, POSITIVE.ok, "3"),
    "per_device_train_batch_size": POSITIVE_INT,
    "per_device_eval_batch_size": POSITIVE_INT,
    "gradient_accumulation_steps": POSITIVE_INT,
    "logging_steps": EVERY,
    "save_steps": EVERY,
    "eval_steps": Rule("null (= logging_steps) or " + EVERY.text, lambda x: x is None or EVERY.ok(x), "500"),
    "save_total_limit": OPTIONAL_POSITIVE_INT,
    "seed": NON_NEGATIVE_INT,
    "dataloader_num_workers": NON_NEGATIVE_INT,
    # adapter
    "lora_r": POSITIVE_INT,
    "lora_alpha": Rule(POSITIVE.text, POSITIVE.ok, "16"),
    "lora_dropout": FRACTION,
    # data and lengths
    "test_size": Rule(
        "a fraction in [0, 1) or a whole count of rows",
        lambda x: _num(x) and x >= 0 and (x < 1 or float(x).is_integer()),
        "0.1",
    ),  # fmt: skip
    "max_train_samples": OPTIONAL_POSITIVE_INT,
    "max_eval_samples": OPTIONAL_POSITIVE_INT,
    "dataset_num_proc": OPTIONAL_POSITIVE_INT,
    "streaming_shuffle_buffer": NON_NEGATIVE_INT,
    "streaming_check_rows": NON_NEGATIVE_INT,
    "block_size": Rule("a whole number >= 2", lambda x: _int(x) and x >= 2, "512"),
    "max_length": OPTIONAL_POSITIVE_INT,
    "max_prompt_length": OPTIONAL_POSITIVE_INT,
    "max_completion_length": OPTIONAL_POSITIVE_INT,
    "min_free_disk_gb": NON_NEGATIVE,
    "max_truncated_fraction": UNIT,
    # tool-use GRPO (alignkit.train.tools)
    "tool_timeout": Rule("a number of seconds > 0", POSITIVE.ok, "5.0"),
    "max_tool_calling_iterations": OPTIONAL_POSITIVE_INT,
    # preference tuning (trl DPOConfig)
    "beta": Rule("a number > 0", POSITIVE.ok, "0.1"),
    # task heads and generation (Seq2SeqTrainingArguments, alignkit.tasks)
    "max_target_length": POSITIVE_INT,
    "generation_max_length": OPTIONAL_POSITIVE_INT,
    "generation_num_beams": OPTIONAL_POSITIVE_INT,
    "doc_stride": POSITIVE_INT,
    "n_best_size": POSITIVE_INT,
    "max_answer_length": POSITIVE_INT,
    "mlm_probability": Rule("a number in (0, 1)", lambda x: _num(x) and 0 < x < 1, "0.15"),
    "label_smoothing": Rule("a number in [0, 0.5)", lambda x: _num(x) and 0 <= x < 0.5, "0.0"),
}

# key -> {config class name -> rule}: where one stage's key means something else (GRPO's beta is a KL weight, 0 by
# default in trl 1.16: no KL term; DPO/KTO/ORPO/SimPO's beta is a temperature and must be positive).
CLASS_RANGES: dict[str, dict[str, Rule]] = {
    "beta": {
        "GRPOConfig": Rule("a number >= 0 (0: no KL term)", NON_NEGATIVE.ok, "0.04"),
        "RLOOConfig": Rule("a number >= 0 (0: no KL term)", NON_NEGATIVE.ok, "0.05"),
        "OnlineDPOConfig": Rule("a number > 0 (DPO's temperature)", POSITIVE.ok, "0.1"),
        "DistillConfig": Rule("a number in [0, 1] (0: forward KL, 1: reverse KL, 0.5: Jensen-Shannon)", UNIT.ok, "1.0"),
    },
    "num_generations": {
        "GRPOConfig": Rule("a whole number >= 2", lambda x: _int(x) and x >= 2, "4"),
        "RLOOConfig": Rule(
            "a whole number >= 2 (the leave-one-out baseline needs another)", lambda x: _int(x) and x >= 2, "4"
        ),
    },
    "desirable_weight": {"KTOConfig": WEIGHT},
    "undesirable_weight": {"KTOConfig": WEIGHT},
    "simpo_gamma": {"SimPOConfig": NON_NEGATIVE},
    "cpo_alpha": {"SimPOConfig": NON_NEGATIVE},
    "temperature": {
        "GRPOConfig": TEMPERATURE,
        "RLOOConfig": TEMPERATURE,
        "OnlineDPOConfig": TEMPERATURE,
        "DistillConfig": TEMPERATURE,
    },
    "max_new_tokens": {"OnlineDPOConfig": POSITIVE_INT},
    "max_completion_length": {"DistillConfig": POSITIVE_INT},
    "missing_eos_penalty": {
        "OnlineDPOConfig": Rule("null or a number >= 0", lambda x: x is None or NON_NEGATIVE.ok(x), "1.0")
    },
}


def rule_for(key: str, owners) -> Rule | None:
    """The range rule of ``key`` in the config classes ``owners``: a class's own row, else the shared one."""
    for cls in owners:
        for base in cls.__mro__:
            if base.__name__ in CLASS_RANGES.get(key, {}):
                return CLASS_RANGES[key][base.__name__]
    return RANGES.get(key)


# key -> {config class name -> the values it accepts}, for string keys that upstream checks only once training runs
# (trl's DPO loss is looked up at the first step; transformers checks report_to when the Trainer is built). "*": any
# class. A field whose upstream metadata lists "choices" (trl's SFTConfig.loss_type, ...) is checked against that
# list and needs no row here. Keys that upstream checks when the config is built (optim, lr_scheduler_type,
# eval_strategy, ...) are left to it: the parser reports those. A list value (loss_type, report_to) is checked item
# by item.
CHOICES: dict[str, dict[str, tuple[str, ...]]] = {
    # trl 1.16 DPOConfig.loss_type (DPOTrainer._compute_loss); tests/structure checks it against trl's help text
    "loss_type": {
        "DPOConfig": (
            "sigmoid",
            "hinge",
            "ipo",
            "exo_pair",
            "nca_pair",
            "robust",
            "bco_pair",
            "sppo_hard",
            "aot",
            "aot_unpaired",
            "apo_zero",
            "apo_down",
            "discopop",
            "sft",
            "sigmoid_norm",
        ),
        # trl 1.16 GRPOConfig.loss_type (GRPOTrainer._compute_loss raises on any other only at the first step)
        "GRPOConfig": ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"),
    },  # fmt: skip
    "importance_sampling_level": {"GRPOConfig": ("token", "sequence")},
    "f_divergence_type": {"DPOConfig": ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")},
    # transformers 5.23 integrations (INTEGRATION_TO_CALLBACK), plus its "all" and "none"
    "report_to": {
        "*": (
            "none",
            "all",
            "azure_ml",
            "comet_ml",
            "mlflow",
            "neptune",
            "tensorboard",
            "trackio",
            "wandb",
            "codecarbon",
            "clearml",
            "dagshub",
            "flyte",
            "dvclive",
            "swanlab",
            "kubeflow",
        )
    },  # fmt: skip
}


def allowed_values(key: str, owners) -> tuple | None:
    """The values ``key`` may take in the config classes ``owners`` (its field's upstream ``choices`` metadata, or
    a row of CHOICES for the class or one of its bases), or None when any value may be given."""
    for cls in owners:
        for f in dataclasses.fields(cls):
            if f.name == key and f.metadata.get("choices"):
                return tuple(f.metadata["choices"])
    row = CHOICES.get(key, {})
    for cls in owners:
        for base in cls.__mro__:
            if base.__name__ in row:
                return row[base.__name__]
    return row.get("*")


def check_values(values: dict[str, Any], owners: dict[str, list[type]] | None = None) -> None:
    """Every value a recipe sets whose key has a rule in ``RANGES`` obeys it, and one with a list of allowed values
    (:func:`allowed_values` in the classes ``owners[key]``) is in it; the first that does not raises ConfigError
    naming the key, the value and the fix."""
    from alignkit.errors import suggest

    for key, value in values.items():
        allowed = allowed_values(key, (owners or {}).get(key, []))
        if allowed is not None and value is not None:
            for item in value if isinstance(value, (list, tuple)) else [value]:
                if item not in allowed:
                    raise ConfigError(
                        f"{key}: {item!r} is not one of {list(allowed)}.{suggest(str(item), allowed)} "
                        f"Fix: set {key} to one of them, or remove it to use the default."
                    )
        rule = rule_for(key, (owners or {}).get(key, []))
        if rule is not None and not rule.ok(value):
            raise ConfigError(
                f"{key}: {value!r} is out of range: it must be {rule.text}. Fix: set {key} to a valid value "
                f"(e.g. {key}: {rule.example}), or remove it to use the default."
            )


def check_ranges(groups) -> None:
    """:func:`check_values` over every field of the built ``groups`` (defaults included)."""
    for g in groups:
        if g is not None:
            fields = [f.name for f in dataclasses.fields(g) if f.init]
            check_values({name: getattr(g, name) for name in fields}, {name: [type(g)] for name in fields})


def _value(key: str, values: dict[str, Any], classes) -> Any:
    """The recipe's value of ``key``, else the default of the first class that has it (None: no class has it)."""
    if key in values:
        return values[key]
    for cls in classes:
        for f in dataclasses.fields(cls):
            if f.name == key and f.init:
                if f.default is not dataclasses.MISSING:
                    return f.default
                if f.default_factory is not dataclasses.MISSING:
                    return f.default_factory()
    return None


def _divisors(n: int, low: int = 2) -> list[int]:
    return [d for d in range(low, n + 1) if n % d == 0]


def check_combinations(values: dict[str, Any], classes) -> None:
    """Checks across keys that trl and transformers make in their configs' __post_init__, made here first so that
    the error names the keys the recipe has (trl names generation_batch_size, which it derives from the batch keys)
    and values that work. ``values``: the recipe's coerced values; ``classes``: the stage's dataclasses."""
    for bf16, fp16 in (("bf16", "fp16"), ("bf16_full_eval", "fp16_full_eval")):
        if values.get(bf16) is True and values.get(fp16) is True:
            raise ConfigError(
                f"{bf16} and {fp16} are both true: a run uses one precision. Fix: set one of them to false ({bf16} "
                "where the hardware has it; leave bf16 unset for alignkit to choose by device), or remove both."
            )
    names = {f.name for cls in classes for f in dataclasses.fields(cls)}
    if "use_cpu" in names and (values.get("bf16") is True or values.get("bf16_full_eval") is True):
        from alignkit import runtime

        key = "bf16" if values.get("bf16") is True else "bf16_full_eval"
        if not values.get("use_cpu") and not runtime.gpu_available():
            raise ConfigError(
                f"{key}: true on a machine without a GPU needs use_cpu: true (transformers takes bf16 on a CPU only "
                "as CPU autocast). Fix: add use_cpu: true, or remove bf16 (alignkit then chooses bf16 autocast on a "
                "CPU with bf16 units, fp32 otherwise: docs/cpu-mixed-precision.md)."
            )
    if "num_generations" not in names or "generation_batch_size" not in names:
        return
    ng = _value("num_generations", values, classes)
    batch = _value("per_device_train_batch_size", values, classes)
    if not (_int(ng) and _int(batch)) or ng < 1 or batch < 1:
        return  # check_values names a bad value itself
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    gen_size, steps = values.get("generation_batch_size"), values.get("steps_per_generation")
    if gen_size is not None and steps is not None:
        raise ConfigError(
            f"generation_batch_size ({gen_size}) and steps_per_generation ({steps}) are both set; each fixes the "
            "other. Fix: remove one of them."
        )
    procs = f" x {world} processes" if world > 1 else ""
    strategy = str(_value("eval_strategy", values, classes) or "no").rsplit(".", 1)[-1].lower()
    eval_key = "num_generations_eval" if values.get("num_generations_eval") is not None else "num_generations"
    eval_ng, eval_batch = values.get(eval_key, ng), _value("per_device_eval_batch_size", values, classes)
    if strategy != "no" and _int(eval_ng) and _int(eval_batch) and eval_ng >= 1 and (eval_batch * world) % eval_ng:
        multiple = eval_ng // math.gcd(eval_ng, world)
        raise ConfigError(
            f"{eval_key} ({eval_ng}) must divide the completions generated per evaluation batch: "
            f"per_device_eval_batch_size ({eval_batch}){procs} = {eval_batch * world}. Fix: set "
            f"per_device_eval_batch_size to a multiple of {multiple} (e.g. {multiple * max(1, eval_batch // multiple)}"
            f"), or num_generations_eval to one of {_divisors(eval_batch * world) or [1]}."
        )
    if gen_size is not None:
        if gen_size % (batch * world):
            raise ConfigError(
                f"generation_batch_size ({gen_size}) must be a multiple of per_device_train_batch_size ({batch}){procs}"
                f"{f' (= {batch * world})' if world > 1 else ''}. Fix: set generation_batch_size to e.g. {batch * world * max(1, gen_size // (batch * world))}"
                ", or remove it (default: per_device_train_batch_size x gradient_accumulation_steps)."
            )
        if gen_size % ng:
            raise ConfigError(
                f"generation_batch_size ({gen_size}) must be a multiple of num_generations ({ng}): each prompt's {ng} "
                f"completions are scored as one group in one generation batch. Fix: set num_generations to one of "
                f"{_divisors(gen_size)}, or generation_batch_size to a multiple of {math.lcm(ng, batch * world)}."
            )
        return
    key = "steps_per_generation" if steps is not None else "gradient_accumulation_steps"
    accum = steps if steps is not None else _value("gradient_accumulation_steps", values, classes)
    if not _int(accum) or accum < 1:
        return
    size = batch * world * accum
    if size % ng:
        batches = sorted({ng // math.gcd(ng, world * accum) * k for k in (1, 2)})
        accums = ng // math.gcd(ng, batch * world)
        raise ConfigError(
            f"num_generations ({ng}) must divide the completions generated per step: per_device_train_batch_size "
            f"({batch}) x {key} ({accum}){procs} = {size}; each prompt's {ng} completions are scored as one group. "
            f"Fix: set num_generations to one of {_divisors(size) or [2]}"
            + (" (with a larger batch)" if size < 2 else "")
            + f", or per_device_train_batch_size to {' or '.join(map(str, batches))}, or {key} to {accums}."
        )
