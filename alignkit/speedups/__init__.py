"""Every change alignkit makes to trl, transformers, bitsandbytes or glibc internals, in one table (:data:`SPEEDUPS`).

A row says its ``name``, its ``phase`` and when it applies (a recipe and stage, and what earlier rows did), how it is
applied, and the private upstream names it relies on (``upstream``: tests/structure imports each one and checks the
parameters it uses, so an upgrade that renames one fails there instead of silently losing the speed-up). The rows run
in three named phases, from three call sites:

- ``process`` (:class:`alignkit.train.Run` setup): CPU threads and the glibc allocator; process-wide.
- ``model`` (:func:`alignkit.models.loader.load_base_model`): the loaded model.
- ``trainer`` (:meth:`alignkit.train.Run.build_trainer`): the trainer trl/transformers built.

One recipe key picks the rows: ``speedups: auto`` (default: every row whose condition holds), ``none`` (no optional
row), or a list of names. The two ``required`` rows are fixes without which 4-bit training on CPU is wrong or ~100x
slower; they apply whatever the key says. Older switches stay as aliases: ``ALIGNKIT_CPU_ALLOCATOR=system`` leaves
the allocator alone, a set ``OMP_NUM_THREADS`` the threads, ``attn_implementation`` (any value) the attention and
shared-prompt rows, ``padding_free_batches: false`` the padding-free row. What ran is written into
``alignkit_run.json`` (``LineageEntry.speedups``) and the model card.

Every optional row is exact: the same loss and gradients as without it, within float rounding (its test is named in
its ``doc``). A new speed-up is one row here, its module in this folder, and its test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from alignkit.errors import ConfigError, suggest

PHASES = ("process", "model", "trainer")
CHOICES = ("auto", "none")


@dataclass(frozen=True)
class Upstream:
    """A private upstream name a row relies on, ``"module:Qualified.name"``. ``params``: parameter names its
    signature must have, in this order; ``mentions``: names its source must contain (closure variables, attributes
    set in ``__init__``)."""

    name: str
    params: tuple[str, ...] = ()
    mentions: tuple[str, ...] = ()


@dataclass(frozen=True)
class Context:
    """What a row's condition and apply see: the recipe (``alignkit.config.Recipe``; None at a model load outside a
    run), the stage name, the phase's ``target`` (None / the model / the trainer), and the rows applied so far."""

    recipe: Any = None
    stage: str | None = None
    target: Any = None
    applied: tuple[str, ...] = ()


@dataclass(frozen=True)
class Speedup:
    name: str
    phase: str
    when: Callable[[Context], bool]  # the row applies to this recipe, stage and target
    apply: Callable[[Context], bool]  # True when it changed something
    upstream: tuple[Upstream, ...] = ()
    doc: str = ""  # what it does, and the test that proves it exact
    required: bool = False  # a fix, applied whatever ``speedups`` says
    undo: Callable[[], None] | None = None  # for a process-wide patch: restore upstream when the row is not chosen


def _no_gpu(ctx: Context) -> bool:
    from alignkit.runtime import gpu_available

    return not gpu_available()


def _threads(ctx: Context) -> bool:
    from alignkit.speedups import cpu

    return cpu.fit_cpu_threads() is not None or cpu.fitted_threads() is not None


def _allocator(ctx: Context) -> bool:
    from alignkit.speedups.cpu import fit_cpu_allocator

    return fit_cpu_allocator()


def _is_4bit(ctx: Context) -> bool:
    return bool(getattr(ctx.target, "is_loaded_in_4bit", False))


def _keep_4bit_layout(ctx: Context) -> bool:
    from alignkit.speedups.bnb_4bit import keep_trainable_4bit_layout

    return keep_trainable_4bit_layout(ctx.target)


def _adapter_dtype(ctx: Context) -> bool:
    from alignkit.runtime import resolve_dtype
    from alignkit.speedups.bnb_4bit import adapter_dtype_fix

    return adapter_dtype_fix(ctx.target.model, resolve_dtype(ctx.recipe.quant.bnb_4bit_compute_dtype))


def _padding_free(ctx: Context) -> bool:
    from alignkit.speedups.padding_free import concatenate_rows

    return concatenate_rows(ctx.target)


def _attention_free(ctx: Context) -> bool:
    """The recipe left ``attn_implementation`` to alignkit."""
    return ctx.recipe.model.attn_implementation is None


def _attention(ctx: Context) -> bool:
    from alignkit.speedups.attention import use_fast_attention

    return use_fast_attention(ctx.target.model) is not None


def _shared_prompt(ctx: Context) -> bool:
    from alignkit.speedups.shared_prompt import share_prompts

    return share_prompts(ctx.target)


def _cpu_lm_head(ctx: Context) -> bool:
    from alignkit.speedups.lm_head import use_cpu_lm_head

    return use_cpu_lm_head()


def _fused_cpt_loss(ctx: Context) -> bool:
    from alignkit.speedups.lm_head import fuse_causal_lm_loss

    return fuse_causal_lm_loss(ctx.target)


def _bf16_lora(ctx: Context) -> bool:
    from alignkit.speedups.bf16_lora import use_bf16_lora

    return use_bf16_lora(ctx.target)


def _zero_ref_adapter(ctx: Context) -> bool:
    from alignkit.speedups.reference import drop_zero_ref_adapter

    return drop_zero_ref_adapter(ctx.target)


def _restore_peft_lora() -> None:
    from alignkit.speedups.bf16_lora import restore_peft_lora

    restore_peft_lora()


def _restore_lm_head() -> None:
    from alignkit.speedups.lm_head import restore_trl_lm_head

    restore_trl_lm_head()


_TRL_UTILS = "trl.trainer.utils"
_LOG_PROB_PARAMS = ("ctx", "hidden", "weight", "bias", "targets", "temperature", "chunk_size",
                    "final_logit_softcapping", "logit_scale", "outputs")  # fmt: skip

# fmt: off
SPEEDUPS: tuple[Speedup, ...] = (
    Speedup(
        "cpu_threads", "process", _no_gpu, _threads,
        doc="intra-op threads = this rank's share of the cores other jobs leave free (cpu.fit_cpu_threads); "
        "summation order only (tests/speedups/test_cpu_threads.py)",
    ),
    Speedup(
        "cpu_allocator", "process", _no_gpu, _allocator,
        upstream=(Upstream("ctypes:CDLL"),),  # glibc mallopt(M_MMAP_MAX, M_TRIM_THRESHOLD, M_ARENA_MAX)
        doc="glibc keeps freed tensor memory (cpu.fit_cpu_allocator); the same loss bit for bit "
        "(tests/speedups/test_cpu_allocator.py)",
    ),
    Speedup(
        "keep_4bit_training_layout", "model", _is_4bit, _keep_4bit_layout, required=True,
        upstream=(Upstream("bitsandbytes.nn:Linear4bit.__init__", mentions=("support_avx512bf16_for_cpu",)),
                  Upstream("bitsandbytes.nn:Linear4bit.forward", mentions=("support_avx512bf16_for_cpu",))),
        doc="4-bit layers keep the layout that has a backward (bnb_4bit.py; tests/regression 4-bit invariant)",
    ),
    Speedup(
        "adapter_dtype", "trainer", lambda ctx: ctx.recipe.quant.load_in_4bit, _adapter_dtype, required=True,
        doc="QLoRA adapter weights back in the compute dtype after trl's bf16 cast (bnb_4bit.py)",
    ),
    Speedup(
        "padding_free", "trainer", lambda ctx: bool(getattr(ctx.recipe.train, "padding_free_batches", False)),
        _padding_free,
        upstream=(Upstream("trl.trainer.sft_trainer:DataCollatorForLanguageModeling.padding_free"),),
        doc="SFT rows concatenated instead of padded (padding_free.py; tests/regression padding-free invariant)",
    ),
    Speedup(
        "per_document_attention", "trainer", _attention_free, _attention,
        upstream=(
            Upstream("transformers.integrations.sdpa_attention:sdpa_attention_forward",
                     ("module", "query", "key", "value", "attention_mask", "dropout", "scaling")),
            Upstream("transformers.masking_utils:sdpa_mask",
                     ("batch_size", "q_length", "kv_length", "q_offset", "kv_offset")),
            Upstream("transformers:PreTrainedModel._can_set_attn_implementation"),
            Upstream("transformers:PreTrainedModel.set_attn_implementation"),
        ),  # fmt: skip
        doc="one causal SDPA per document, no (sum of lengths)^2 mask (attention.py; tests/speedups/test_attention.py)",
    ),
    Speedup(
        "shared_prompt", "trainer", lambda ctx: _attention_free(ctx) and "per_document_attention" in ctx.applied,
        _shared_prompt,
        upstream=(
            Upstream(f"{_TRL_UTILS}:add_fused_lm_head", ("model", "temperature", "cast_lm_head_to_fp32", "outputs"),
                     mentions=("_fused_forward", "final_logit_softcapping", "logit_scale")),
            Upstream(f"{_TRL_UTILS}:_ChunkedLogProbFunction.forward", _LOG_PROB_PARAMS),
            Upstream(f"{_TRL_UTILS}:_CHUNKED_LOGPROB_CHUNK_SIZE"),
            Upstream(f"{_TRL_UTILS}:maybe_gather_lm_head_ctx"),
            Upstream(f"{_TRL_UTILS}:FusedCausalLMOutput.__init__",
                     ("self", "loss", "log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1",
                      "label_mask", "aux_loss")),
            Upstream("trl:DPOTrainer._compute_loss", ("self", "model", "inputs", "return_outputs")),
            Upstream("trl:DPOTrainer.compute_ref_log_probs", ("self", "model", "inputs")),
        ),  # fmt: skip
        doc="DPO: one prompt forward per pair, the pairs' attention as one padded batch (shared_prompt.py, "
        "attention.py; tests/speedups/test_shared_prompt.py, 1e-5)",
    ),
    Speedup(
        "zero_ref_adapter", "trainer", lambda ctx: True, _zero_ref_adapter,
        upstream=(
            Upstream("trl:DPOTrainer.compute_ref_log_probs", ("self", "model", "inputs"),
                     mentions=("use_adapter", "peft_config")),
            Upstream("trl:DPOTrainer._compute_loss", ("self", "model", "inputs", "return_outputs"),
                     mentions=("use_adapter", "peft_config")),
            Upstream("trl:KTOTrainer.compute_ref_log_probs", mentions=("use_adapter", "peft_config")),
            Upstream("trl:GRPOTrainer._generate_and_score_completions", mentions=("use_adapter", "peft_config")),
            Upstream("trl:RLOOTrainer._generate_and_score_completions", mentions=("use_adapter", "peft_config")),
            Upstream(f"{_TRL_UTILS}:use_adapter", ("model", "adapter_name")),
            Upstream("peft:PeftModel.delete_adapter", ("self", "adapter_name")),
            Upstream("peft:PeftModel.disable_adapter.__wrapped__", ("self",),
                     mentions=("get_model_status", "enabled", "disable_adapter_layers", "enable_adapter_layers",
                               "_adapters_disabled", "is_prompt_learning", "is_adaption_prompt")),
            Upstream("peft.tuners.tuners_utils:BaseTuner._enable_adapter_layers", ("self", "enabled"),
                     mentions=("modules", "BaseTunerLayer", "AuxiliaryTrainingWrapper", "enable_adapters")),
            Upstream("peft.tuners.tuners_utils:BaseTuner.disable_adapter_layers", ("self",),
                     mentions=("active_adapters", "peft_config", "bias_val", "_enable_adapter_layers")),
            Upstream("peft.tuners.tuners_utils:BaseTuner.enable_adapter_layers", ("self",),
                     mentions=("_enable_adapter_layers",)),
            Upstream("peft.utils.other:AuxiliaryTrainingWrapper.enable_adapters", ("self", "enabled")),
            Upstream("peft.tuners.tuners_utils:BaseTunerLayer.enable_adapters", ("self", "enabled")),
        ),  # fmt: skip
        doc="trl's 'ref' copy of a fresh LoRA adapter (lora_B zero: it adds nothing) deleted, so the reference pass "
        "runs the base model: the same reference log-probs bit for bit (reference.py; "
        "tests/speedups/test_zero_ref_adapter.py)",
    ),
    Speedup(
        "cpu_lm_head", "trainer", _no_gpu, _cpu_lm_head, undo=_restore_lm_head,
        upstream=(
            Upstream(f"{_TRL_UTILS}:_ChunkedLogProbFunction.forward", _LOG_PROB_PARAMS),
            Upstream(f"{_TRL_UTILS}:_use_triton", ("device",)),
            Upstream(f"{_TRL_UTILS}:maybe_gather_lm_head_ctx"),
        ),
        doc="trl's fused LM head in native kernels on CPU, its GEMMs in bf16 under bf16 autocast (lm_head.py; "
        "tests/speedups/test_cpu_lm_head.py, test_bf16.py)",
    ),
    Speedup(
        "cpu_bf16_lora", "trainer", _no_gpu, _bf16_lora, undo=_restore_peft_lora,
        upstream=(
            Upstream("peft.tuners.lora.layer:Linear.forward", ("self", "x"),
                     mentions=("base_layer", "lora_dropout", "scaling", "_cast_input_dtype", "lora_variant",
                               "disable_adapters")),
            Upstream("peft.tuners.lora.layer:LoraLayer.__init__", mentions=("merged_adapters", "lora_variant")),
        ),  # fmt: skip
        doc="LoRA layers under CPU bf16 autocast: weights without gradient (the base; an adapter frozen or under "
        "no_grad) cast to bf16 once, not every step; one input cast shared by sibling layers; dropout in bf16 from "
        "16 random bits; a trained layer as one autograd node (LoraLinear) (bf16_lora.py; "
        "tests/speedups/test_bf16_lora.py)",
    ),
    Speedup(
        "cpt_fused_lm_head", "trainer", lambda ctx: ctx.stage == "cpt", _fused_cpt_loss,
        upstream=(
            Upstream(f"{_TRL_UTILS}:add_fused_lm_head", ("model", "temperature", "cast_lm_head_to_fp32", "outputs"),
                     mentions=("fused_lm_head", "num_items_in_batch")),
            Upstream("transformers:Trainer.compute_loss", ("self", "model", "inputs", "return_outputs",
                                                           "num_items_in_batch")),
        ),  # fmt: skip
        doc="CPT's loss without the full logits: trl's fused LM head in chunks (lm_head.py; "
        "tests/speedups/test_cpu_lm_head.py, the same loss and gradients)",
    ),
)
# fmt: on
NAMES = tuple(s.name for s in SPEEDUPS)


def check_choice(choice: Any, key: str = "speedups") -> None:
    """ConfigError unless ``choice`` is 'auto', 'none', a row name or a list of row names (did-you-mean on names)."""
    names = [choice] if isinstance(choice, str) and choice not in CHOICES else choice
    if isinstance(choice, str) and choice in CHOICES:
        return
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{key}: {choice!r} is not auto, none or a list of names. Fix: use one of {list(NAMES)}.")
    for name in names:
        if name not in NAMES:
            raise ConfigError(
                f"{key}: '{name}' is not a speed-up.{suggest(name, NAMES)} Fix: list names of {list(NAMES)}, or "
                "write auto (every one that applies) or none."
            )


def chosen(choice: Any = "auto") -> tuple[str, ...]:
    """The row names ``choice`` (the ``speedups`` key) allows, required rows included."""
    check_choice(choice)
    if choice == "auto":
        return NAMES
    names = [] if choice == "none" else [choice] if isinstance(choice, str) else list(choice)
    return tuple(s.name for s in SPEEDUPS if s.required or s.name in names)


def apply(phase: str, target: Any = None, *, recipe: Any = None, stage: str | None = None,
          applied: tuple[str, ...] = ()) -> list[str]:  # fmt: skip
    """Apply the ``phase`` rows that the recipe's ``speedups`` key allows and whose condition holds, in table order.
    Returns the names of those that changed something. ``applied``: rows applied earlier in this run."""
    if phase not in PHASES:
        raise ValueError(f"phase {phase!r} is not one of {PHASES}")
    allowed = chosen(getattr(getattr(recipe, "run", None), "speedups", "auto"))
    done: list[str] = []
    for row in (s for s in SPEEDUPS if s.phase == phase):
        ctx = Context(recipe, stage, target, (*applied, *done))
        if row.name in allowed and row.when(ctx):
            if row.apply(ctx):
                done.append(row.name)
        elif row.undo is not None:
            row.undo()
    return done


def check_upstream(rows: tuple[Speedup, ...] = SPEEDUPS) -> list[str]:
    """Every private upstream name the rows rely on, checked: importable, with the parameters and mentions each row
    needs. Returns one line per problem (empty when this trl/transformers/bitsandbytes still fits)."""
    import importlib
    import inspect

    problems = []
    for row in rows:
        for up in row.upstream:
            module, _, qualname = up.name.partition(":")
            try:
                obj = importlib.import_module(module)
                for part in qualname.split("."):
                    obj = getattr(obj, part)
                    if str(getattr(obj, "__module__", "")).startswith("alignkit.") and getattr(obj, "upstream", None):
                        obj = obj.upstream  # patched in this process already: check what it stands in for
            except (ImportError, AttributeError) as exc:
                problems.append(f"{row.name}: {up.name} is gone ({exc})")
                continue
            if up.params:
                have = tuple(inspect.signature(obj).parameters)
                if have[: len(up.params)] != up.params:
                    problems.append(f"{row.name}: {up.name} takes {have}, the row relies on {up.params}")
            if up.mentions:
                used = _code_names(getattr(obj, "__code__", None))
                missing = [m for m in up.mentions if m not in used]
                if missing:
                    problems.append(f"{row.name}: {up.name} no longer uses {missing}")
    return problems


def _code_names(code) -> set[str]:
    """The names a code object and the functions defined in it use: attributes, variables, closures, their names."""
    if code is None:
        return set()
    names = {code.co_name, *code.co_names, *code.co_varnames, *code.co_freevars, *code.co_cellvars}
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            names |= _code_names(const)
    return names


__all__ = ["NAMES", "PHASES", "SPEEDUPS", "Context", "Speedup", "Upstream", "apply", "check_choice", "check_upstream",
           "chosen"]  # fmt: skip
