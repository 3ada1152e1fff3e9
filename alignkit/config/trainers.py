"""The stages' own config: each stage's trainer config, subclassing its trl/transformers base (``SFTConfig`` trl's,
``CPTConfig`` and ``TaskConfig`` transformers') with alignkit's defaults and the device-aware choices, and the extra
groups of the task and GRPO recipes. Building one changes only the object: threads and the allocator are the
process phase of alignkit.speedups, applied by a run. (The groups every stage shares are in alignkit.config.args.)"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import transformers
import trl

from alignkit import runtime


def _device_defaults(args) -> None:
    """Decide by device, before transformers sets up its state in __post_init__. Precision: trl defaults to bf16=True;
    alignkit takes bf16 weights only on GPUs that support it. On CPUs without bf16 units bf16 is many times slower
    than fp32; on CPUs with them 'auto' adds bf16 autocast on fp32 weights (:func:`precision_defaults`; SmolLM2 LoRA
    on AMX: ~2x fp32 at 1 thread, benchmarks/README.md). Backend: see :func:`fit_backend_to_device`. Only
    ``args`` changes: threads and the allocator are the process phase of alignkit.speedups, applied by a run."""
    import importlib.util

    if getattr(args, "bf16", None) is None:
        args.bf16 = runtime.device_supports_bf16() and not args.fp16
    # transformers 5.23 renamed gradient_checkpointing to activation_checkpointing (the old name, deprecated, warns when
    # set and then mirrors the new one). trl's True recomputes activations: ~1/3 more compute, so by device here.
    if getattr(args, "activation_checkpointing", False) is None and getattr(args, "gradient_checkpointing", 0) is None:
        args.activation_checkpointing = runtime.gpu_available()
    if getattr(args, "use_liger_kernel", False) is None:
        args.use_liger_kernel = runtime.gpu_available() and importlib.util.find_spec("liger_kernel") is not None
    fit_backend_to_device(args)


def fit_backend_to_device(args) -> None:
    """Give a multi-process launch on a machine without GPUs a CPU backend, before transformers builds its state.

    accelerate 1.15 ``PartialState._prepare_backend`` picks a backend only for a device it finds (nccl for CUDA, ...)
    or, for CPUs, only when ``cpu=True``. A DeepSpeed launch never passes ``cpu=True`` (that would disable DeepSpeed),
    so on a GPU-less machine the backend stays None: DeepSpeed still joins its process group, but ``__init__`` then
    takes the "no backend == no distributed training" branch and every rank reports process_index 0 of 1, so no rank
    gets its own shard of the data. A DDP (MULTI_GPU) launch falls into the same branch. Here: DeepSpeed gets
    ``ddp_backend="gloo"`` (PartialState then reads rank and world size from the process group) and plain data
    parallel gets ``use_cpu=True`` (accelerate's MULTI_CPU path, gloo as well).
    """
    import torch

    if not runtime.launched_distributed() or torch.cuda.is_available() or args.use_cpu:
        return
    if runtime.env_flag("ACCELERATE_USE_DEEPSPEED") or args.deepspeed:
        args.ddp_backend = args.ddp_backend or "gloo"
    elif not runtime.env_flag("ACCELERATE_USE_FSDP"):
        args.use_cpu = True


def precision_defaults(values: dict[str, Any], fields) -> dict[str, Any]:
    """bf16 mixed precision on a CPU with bf16 units, as trainer-config values to add to the recipe's ``values``
    (before the groups are built, so ``--print_config`` and the saved config show it): ``{bf16: True, use_cpu: True}``
    (transformers 5.23 accepts bf16 on a CPU only with ``use_cpu``; accelerate 1.15 then wraps the model's forward in
    ``torch.autocast("cpu", torch.bfloat16)``: fp32 weights, optimizer state and adapters, bf16 matmuls) when the
    recipe's dtype key (``bnb_4bit_compute_dtype`` for a 4-bit model, else ``dtype``) is 'auto', it sets none of
    bf16/fp16/use_cpu, no GPU is present, no DeepSpeed/FSDP launch, and :func:`runtime.cpu_mixed_precision` chose bf16.
    Else ``{}``. ``fields``: the names the recipe's groups know (a stage without a trainer config gets ``{}``)."""
    if "bf16" not in fields or any(k in values for k in ("bf16", "fp16", "use_cpu")):
        return {}
    key = values.get("bnb_4bit_compute_dtype", "auto") if values.get("load_in_4bit") else values.get("dtype", "auto")
    if values.get("deepspeed") or values.get("fsdp") or runtime.env_flag("ACCELERATE_USE_DEEPSPEED"):
        return {}
    if runtime.env_flag("ACCELERATE_USE_FSDP") or not runtime.uses_cpu_amp(key):
        return {}
    return {"bf16": True, "use_cpu": True}


def precision_record(recipe) -> dict[str, Any]:
    """The precision ``recipe`` trains in (:func:`runtime.precision_summary`: weights, mixed precision, 4-bit compute,
    and on a CPU the decision, CPU facts and probe figures)."""
    t, q = recipe.train, recipe.quant
    mixed = "bf16" if getattr(t, "bf16", False) else "fp16" if getattr(t, "fp16", False) else "no"
    key = q.bnb_4bit_compute_dtype if q.load_in_4bit else recipe.model.dtype
    return runtime.precision_summary(key, mixed, q.load_in_4bit)


_ALIGNKIT_DEFAULTS = dict(
    output_dir="outputs/run", report_to="none", logging_steps=1, save_strategy="steps", save_steps=500
)


def _default(name, value=None, **kw):
    value = _ALIGNKIT_DEFAULTS[name] if value is None else value
    if isinstance(value, (list, dict)):
        return field(default_factory=lambda: value, **kw)
    return field(default=value, **kw)


@dataclass
class _StageDefaults:
    """What every stage's trainer config shares on top of its trl/transformers base: alignkit's defaults and the
    device-aware choices (made before the base's __post_init__ sets up transformers' state)."""

    output_dir: str = _default("output_dir")
    report_to: Any = _default("report_to")
    logging_steps: float = _default("logging_steps")
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision (default: by device; CPUs: docs/cpu-mixed-precision.md)."}
    )

    def __post_init__(self):
        from alignkit.errors import ConfigError, deepspeed_missing

        if getattr(self, "deepspeed", None) and (missing := deepspeed_missing(f"deepspeed: {self.deepspeed}")):
            raise ConfigError(missing)  # else transformers' __post_init__ fails on the missing package's metadata
        _device_defaults(self)
        super().__post_init__()


@dataclass
class _LanguageModelSpeed:
    """trl trainers' speed settings whose trl defaults suit a GPU only."""

    activation_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Recompute activations in backward: less memory, more compute (default: GPU on, CPU off)."},
    )
    gradient_checkpointing: bool | None = field(  # unset, unlike trl's True: transformers warns about a set old name
        default=None, metadata={"help": "transformers' deprecated name of activation_checkpointing (still read)."}
    )
    use_liger_kernel: bool | None = field(
        default=None, metadata={"help": "Liger's fused kernels (default: on GPU when liger-kernel is installed)."}
    )


@dataclass
class CPTConfig(_StageDefaults, transformers.TrainingArguments):
    """Causal-LM (continued) pretraining: transformers' TrainingArguments plus block packing."""

    block_size: int = field(default=512, metadata={"help": "Tokens per packed training block."})


@dataclass
class SFTConfig(_StageDefaults, _LanguageModelSpeed, trl.SFTConfig):
    """trl's SFTConfig with device-aware precision and alignkit's defaults."""

    padding_free_batches: bool = field(
        default=True,
        metadata={
            "help": "Concatenate each batch's rows into one sequence instead of padding them: no compute on pad tokens, "
            "same loss per row (position ids restart per row). max_length still truncates; trl's own padding_free "
            "needs packing or max_length: null."
        },
    )


@dataclass
class DPOConfig(_StageDefaults, _LanguageModelSpeed, trl.DPOConfig):
    """trl's DPOConfig with device-aware precision and alignkit's defaults."""


@dataclass
class KTOConfig(_StageDefaults, _LanguageModelSpeed, trl.KTOConfig):
    """trl's KTOConfig: Kahneman-Tversky Optimization (Ethayarajh et al. 2024, arXiv:2402.01306) on unpaired
    ``prompt`` / ``completion`` / boolean ``label`` rows. ``beta``, ``desirable_weight``, ``undesirable_weight`` and
    ``loss_type`` (kto | apo_zero_unpaired) are trl's. The reference is the starting adapter's frozen copy."""


@dataclass
class RewardConfig(_StageDefaults, _LanguageModelSpeed, trl.RewardConfig):
    """trl's RewardConfig: a Bradley-Terry reward model (Ouyang et al. 2022, arXiv:2203.02155) on
    ``prompt``/``chosen``/``rejected`` pairs; the head is a one-output sequence-classification head trained in full
    next to the LoRA adapter on the same (4-bit) backbone."""


@dataclass
class GRPOConfig(_StageDefaults, _LanguageModelSpeed, trl.GRPOConfig):
    """trl's GRPOConfig: group relative policy optimisation (Shao et al. 2024, arXiv:2402.03300). Completions come from
    ``model.generate`` (``use_vllm`` and the vllm_* keys pass through to trl where a GPU has vLLM). ``num_generations``
    completions per prompt; ``beta`` > 0 adds a KL term against the starting adapter (the adapter-disabled model)."""

    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate (trl's GRPO default: 1e-6)."})


@dataclass
class RLOOConfig(_StageDefaults, _LanguageModelSpeed, trl.RLOOConfig):
    """trl's RLOOConfig: REINFORCE leave-one-out (Ahmadian et al. 2024, arXiv:2402.14740). Each of a prompt's
    ``num_generations`` completions is scored and its advantage is its reward minus the mean of the others' (its
    group's leave-one-out baseline); ``beta`` > 0 (trl's default 0.05) adds a KL term against the starting adapter
    (the adapter-disabled model). The rewards are GRPO's (``reward_funcs``), checked on the first rows the same way."""

    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate (trl's RLOO default: 1e-6)."})


@dataclass
class DistillConfig(_StageDefaults, _LanguageModelSpeed, trl.DistillationConfig):
    """trl's DistillationConfig: on-policy distillation (Agarwal et al. 2024, arXiv:2306.13649). The student (the
    recipe's model, 4-bit + LoRA as any stage's) samples completions of the prompts (``max_completion_length``,
    ``temperature``) and learns the teacher's full next-token distribution on them: the loss is the generalized
    Jensen-Shannon divergence, ``beta`` 0 forward KL(teacher || student), 1 reverse KL (trl's default), 0.5 JSD.
    ``teacher_model_name_or_path``: a merged alignkit run, a model folder or a model name (tiny:..., smollm2:...), with
    the student's vocabulary (checked on the tokenizers before any weights load); it loads frozen in full precision."""

    learning_rate: float = field(
        default=1e-4, metadata={"help": "AdamW learning rate (trl's distillation default: 1e-6)."}
    )


@dataclass
class TaskConfig(_StageDefaults, transformers.Seq2SeqTrainingArguments):
    """Classical task heads: transformers' Seq2SeqTrainingArguments (a superset of TrainingArguments)."""

    max_length: int = field(default=256, metadata={"help": "Max tokens per input (QA: per window)."})


@dataclass
class TaskArguments:
    """The task recipe's own key: which head to train. Each task module adds its own group of keys
    (``alignkit.tasks.base.Task.Arguments``)."""

    task: str | None = field(
        default=None,
        metadata={"help": "The model head: token_cls (NER/POS), seq_cls, qa, mlm, seq2seq (alignkit/tasks/)."},
    )


@dataclass
class RewardFunctionArguments:
    """The GRPO, RLOO and online DPO recipes' rewards (alignkit.train.rewards): each entry of ``reward_funcs`` is a
    built-in verifiable reward, a trained reward model (an alignkit reward output folder), or a Python function by
    import path."""

    reward_funcs: list[str] = field(
        default_factory=lambda: ["format", "exact"],
        metadata={
            "help": "Rewards, summed with trl's reward_weights: 'format' (1 if the completion matches "
            "reward_pattern), 'exact' (1 if the pattern's first group equals the reference column), 'numeric' (1 if "
            "it is within numeric_tolerance of the reference number), a folder written by the reward stage (its "
            "score), or 'package.module:function' (your code: imported only because the recipe names it; called as "
            "trl calls reward functions: f(prompts, completions, **columns) -> list of floats)."
        },
    )
    reward_pattern: str = field(
        default=r"ANSWER:\s*(-?\d+(?:\.\d+)?)",
        metadata={"help": "Regex of the answer format; its first group is the answer 'exact' and 'numeric' compare."},
    )
    reference_column: str = field(
        default="answer", metadata={"help": "The data column with the reference answer (for 'exact' and 'numeric')."}
    )
    numeric_tolerance: float = field(default=1e-6, metadata={"help": "Absolute tolerance of 'numeric'."})
    nonfinite_rewards: str = field(
        default="refuse",
        metadata={
            "help": "A reward function returning NaN or inf: 'refuse' (stop the run naming the function; a NaN "
            "reward silently trains on nothing) or 'skip' (treat it as None, trl's skip: the completion gets no "
            "score from that function). Either way skips and non-finite values are counted in the logs as "
            "rewards/<function>/skipped and rewards/<function>/nonfinite.",
            "choices": ["refuse", "skip"],
        },
    )


@dataclass
class ToolArguments:
    """Tool-use GRPO (alignkit.train.tools): the Python functions a rollout may call, passed to trl's
    ``GRPOTrainer(tools=...)``. Each is checked before the model loads: importable, callable, a docstring and type
    hints from which transformers builds its JSON schema (what the model is shown), matching the data's ``tools``."""

    tools: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Functions the model may call during a rollout, as 'package.module:function'; each runs in this "
            "process under tool_timeout and its exceptions and timeouts come back to the model as tool errors. The "
            "model sees each function's schema (its name, type hints and Google-style docstring); rows' 'tools' "
            "may only declare these. Needs a chat template that renders tool calls (e.g. chat_template: qwen2_5)."
        },
    )
    tool_timeout: float = field(
        default=10.0,
        metadata={"help": "Seconds one tool call may run; past it the model gets a tool error instead of a result."},
    )
