"""One backbone loader for every task: full precision or 4-bit (bitsandbytes nf4), with or without a PEFT adapter,
and the hand-off of an earlier stage's adapter.

Pure functions turn config groups into objects (``get_quantization_config``, ``get_peft_config``), as trl's
scripts do; ``load_model`` composes them. Where a model comes from is :mod:`alignkit.models.sources`; what each head
is, :mod:`alignkit.models.heads`; device and launch facts, :mod:`alignkit.runtime`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from alignkit import runtime, speedups
from alignkit.config.args import AdapterArguments, ModelArguments, QuantizationArguments
from alignkit.errors import ConfigError, PreflightError, suggest
from alignkit.models.heads import check_head_exists, get_head
from alignkit.models.sources import ModelSource, resolve_source
from alignkit.stages import stages_training

logger = logging.getLogger(__name__)

# Gradient checkpointing as transformers' Trainer sets it by default. Reentrant checkpointing breaks DDP with an
# adapter ("mark a variable ready only once"); torch's own default is reentrant, so peft must be told.
NON_REENTRANT = {"use_reentrant": False}


def get_quantization_config(quant_args: QuantizationArguments, task: str = "causal_lm"):
    """BitsAndBytesConfig for a 4-bit backbone, or None. The task's head is kept out of quantization."""
    if not quant_args.load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig

    compute = runtime.compute_dtype_name(quant_args.bnb_4bit_compute_dtype)  # bf16 on AMX/AVX512-BF16 CPUs too
    # ZeRO-3 / FSDP flatten and split all parameters together: packed 4-bit weights must share the others' dtype.
    storage = runtime.quant_storage_name(quant_args.bnb_4bit_quant_storage, compute)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_args.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=quant_args.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=getattr(torch, compute),
        bnb_4bit_quant_storage=getattr(torch, storage),
        # Replacing the default skip list drops transformers' own (lm_head), so name it again.
        llm_int8_skip_modules=sorted(set(get_head(task).modules) | {"lm_head"}),
    )


def get_peft_config(adapter_args: AdapterArguments, task: str = "causal_lm"):
    """LoraConfig from the adapter args; new task heads are trained in full via ``modules_to_save``."""
    if not adapter_args.use_peft:
        return None
    from peft import LoraConfig

    head = get_head(task)
    modules_to_save = list(adapter_args.lora_modules_to_save or [])
    if head.new:
        modules_to_save += [h for h in head.modules if h not in modules_to_save]
    return LoraConfig(
        r=adapter_args.lora_r,
        lora_alpha=adapter_args.lora_alpha,
        lora_dropout=adapter_args.lora_dropout,
        target_modules=adapter_args.lora_target_modules,
        modules_to_save=modules_to_save or None,
        use_dora=adapter_args.use_dora,
        use_rslora=adapter_args.use_rslora,
        task_type=head.peft_task_type,
        bias="none",
        # a tied LM head (tie_word_embeddings: SmolLM2, Gemma 3) in modules_to_save trains the one shared matrix, so
        # the merged model stays tied (peft's default trains a copy and unties the model on merge)
        ensure_weight_tying=bool({"lm_head", "embed_tokens"} & set(modules_to_save)),
    )


def _check_weights_format(source: ModelSource, allow_pickle: bool) -> None:
    """Safetensors only, unless the recipe allows pickle weights (which can run arbitrary code on load)."""
    base = Path(source.base)
    if allow_pickle or not base.is_dir():
        return
    names = {p.name for p in base.iterdir()}
    has_safe = any(n.endswith(".safetensors") for n in names)
    has_pickle = any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in names)
    if has_pickle and not has_safe:
        raise PreflightError(
            f"{base}: holds only pickle weights (.bin/.pt), which can run code when loaded. Fix: convert them to "
            "safetensors, or set allow_pickle_weights: true if you trust the files."
        )


def load_config(model_args: ModelArguments, source: ModelSource | None = None, **config_kwargs):
    from transformers import AutoConfig

    source = source or resolve_source(model_args)
    kwargs: dict[str, Any] = {"trust_remote_code": model_args.trust_remote_code, "revision": model_args.revision}
    try:
        config = AutoConfig.from_pretrained(source.base, **kwargs, **config_kwargs)
    except OSError as exc:  # a Hub id without the Hub, a folder without config.json
        raise PreflightError(
            f"model_name_or_path: could not load '{model_args.model_name_or_path}' ({str(exc).splitlines()[0]}). Fix: "
            "point it at a local model directory or .gguf file; Hub ids need network access."
        ) from None
    for key, value in (model_args.config_overrides or {}).items():
        if not hasattr(config, key):
            raise ConfigError(f"config_overrides: the model config has no field '{key}'.")
        setattr(config, key, value)
    return config


def load_base_model(
    model_args: ModelArguments,
    quant_args: QuantizationArguments | None = None,
    task: str = "causal_lm",
    source: ModelSource | None = None,
    **head_kwargs,
):
    """The backbone with its task head, full precision or 4-bit, no adapter. ``head_kwargs``: num_labels, id2label..."""
    quant_args = quant_args or QuantizationArguments()
    source = source or resolve_source(model_args)
    _check_weights_format(source, model_args.allow_pickle_weights)
    auto = get_head(task).auto()
    dtype = runtime.resolve_dtype(quant_args.bnb_4bit_compute_dtype if quant_args.load_in_4bit else model_args.dtype)
    config = load_config(model_args, source, **head_kwargs)
    check_head_fits(model_args, config, task, source)
    if model_args.from_scratch:
        torch_model = auto.from_config(config, trust_remote_code=model_args.trust_remote_code)
        return torch_model.to(dtype)
    kwargs: dict[str, Any] = {
        "config": config,
        "dtype": dtype,
        "trust_remote_code": model_args.trust_remote_code,
        "revision": model_args.revision,
        "use_safetensors": None if model_args.allow_pickle_weights else True,
    }
    if model_args.attn_implementation:
        if model_args.attn_implementation == "sdpa_per_document":
            from alignkit.speedups.attention import register

            register()
        kwargs["attn_implementation"] = model_args.attn_implementation
    quantization_config = get_quantization_config(quant_args, task)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if source.fold_adapters and quantization_config is not None:
        raise ConfigError(
            f"load_in_4bit: {source.fold_adapters[-1]} must be merged into the base weights first (adapter_handoff: "
            "reference), and merging into 4-bit weights re-quantizes them, losing most of the adapter. Fix: set "
            "adapter_handoff: merge (merges in full precision, then quantizes) or continue, or load_in_4bit: false."
        )
    try:
        model = auto.from_pretrained(source.base, **kwargs)
    except OSError as exc:
        raise PreflightError(
            f"model_name_or_path: could not load '{model_args.model_name_or_path}' ({exc}). Fix: point it at a local "
            "model directory or .gguf file; Hub ids need network access."
        ) from exc
    model.alignkit_speedups = speedups.apply("model", model)  # the model phase (alignkit.speedups)
    return _fold(model, source.fold_adapters)


def check_source_head(source: ModelSource, task: str) -> None:
    """An earlier stage's adapter continues only with the head it trained (the run loop calls this before anything
    loads; the loader again, for direct callers)."""
    trained = source.lineage[-1].task if source.lineage else None
    if source.adapter_dir and trained and trained != task:
        merge_first = (
            f"; or, to train the {task} head on this run's weights (a reward model from SFT), merge it first "
            f"(alignkit merge {source.adapter_dir}) and start from the merged folder"
            if trained == "causal_lm"
            else ""
        )
        raise PreflightError(
            f"model_name_or_path: {source.adapter_dir} holds a {trained} adapter, and this stage trains a {task} head. "
            f"Fix: start this stage from a model with that head (for {'/'.join(stages_training('causal_lm'))}: a "
            f"causal LM or its CPT/SFT output; for {'/'.join(stages_training('seq_cls'))}: a causal LM base)"
            f"{merge_first}."
        )


def check_head_fits(model_args, config, task: str, source: ModelSource) -> None:
    """A causal-LM stage needs a decoder: an encoder (BERT) loaded as a causal LM sees the tokens it predicts, an
    encoder-decoder loses its encoder. And an earlier stage's output continues only with the head it trained."""
    check_source_head(source, task)
    check_head_exists(config, task, model_args.model_name_or_path)
    if task != "causal_lm":
        return
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    encoder = config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False)
    if getattr(config, "is_encoder_decoder", False) or encoder:
        kind = "an encoder-decoder" if getattr(config, "is_encoder_decoder", False) else "an encoder (bidirectional)"
        raise ConfigError(
            f"model_name_or_path: '{model_args.model_name_or_path}' is {kind} model ({config.model_type}), not a causal "
            "LM: trained as one it would see the tokens it predicts. Fix: use a decoder model (Llama, SmolLM2, ...) for "
            f"{'/'.join(stages_training('causal_lm'))}, or the task recipe (alignkit task: mlm, seq2seq, ...) for this "
            "model."
        )


def _fold(model, adapter_dirs: list[str]):
    """Merge earlier stages' adapters into the full-precision weights, in order (exact up to float rounding)."""
    from peft import PeftModel

    for adapter_dir in adapter_dirs:
        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return model.requires_grad_(True) if adapter_dirs else model  # peft froze the weights; loaded models are not


def apply_adapter(
    model, adapter_args: AdapterArguments, task: str, *, quantized: bool, gradient_checkpointing: bool = False
):
    """Prepare a (possibly 4-bit) model for training and wrap it with a fresh PEFT adapter."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs=NON_REENTRANT
        )
    peft_config = get_peft_config(adapter_args, task)
    new_ids = getattr(model, "alignkit_new_token_ids", None)
    if peft_config is not None and new_ids:  # a family's end-of-turn token the recipe added: train its rows
        peft_config.trainable_token_indices = list(new_ids)
    if peft_config is None:
        return model
    _check_target_modules(model, peft_config)
    _check_modules_to_save(model, adapter_args.lora_modules_to_save)
    return get_peft_model(model, peft_config)


def _check_target_modules(model, peft_config) -> None:
    targets = peft_config.target_modules
    if targets in (None, "all-linear"):
        return
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    if isinstance(targets, str):  # peft reads one string as a regular expression over the full module names
        import re

        if not any(re.fullmatch(targets, n) for n, _ in model.named_modules()):
            raise ConfigError(
                f"lora_target_modules: '{targets}' (one string: a regular expression over full module names, as peft "
                f"reads it) matches no module. Fix: write a list, e.g. [{', '.join(linear[:2])}], or 'all-linear'."
            )
        return
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = sorted(t for t in targets if t not in names)
    if missing:
        raise ConfigError(
            f"lora_target_modules: {missing} not found in the model. Fix: use 'all-linear' or some of {linear}."
        )


def _check_modules_to_save(model, names) -> None:
    """Each of the recipe's ``lora_modules_to_save`` names a module (peft matches a full name or its dotted ending);
    peft skips a name that matches nothing, so a typo (``lm_headd``) trained and saved nothing of it, silently."""
    if not names:
        return
    full = [n for n, _ in model.named_modules()]
    missing = [t for t in names if not any(n == t or n.endswith("." + t) for n in full)]
    if missing:
        top = sorted({n.split(".")[-1] for n in full if n and not n.split(".")[-1].isdigit()})
        close = suggest(missing[0], top)
        raise ConfigError(
            f"lora_modules_to_save: {missing} not found in the model.{close} Fix: name modules it has (e.g. lm_head, "
            "embed_tokens), or remove the key."
        )


def load_model(
    model_args: ModelArguments,
    quant_args: QuantizationArguments | None = None,
    adapter_args: AdapterArguments | None = None,
    task: str = "causal_lm",
    *,
    gradient_checkpointing: bool = False,
    tokenizer=None,
    source: ModelSource | None = None,
    lora_dropout: float | None = None,
    **head_kwargs,
):
    """Load the backbone for ``task`` (4-bit if asked) and attach the adapter the recipe asks for.

    When ``model_name_or_path`` is an adapter output of an earlier stage, ``adapter_handoff`` decides what is trained.
    For DPO it also decides the reference: trl 1.16's DPOTrainer, given a PeftModel and ``ref_model=None``, copies
    the adapter ``default`` as it is before training into a frozen adapter named ``ref`` and computes the reference
    log-probs with only ``ref`` active. The reference is therefore always the initial policy, i.e. the earlier
    stage's model, and never a second copy of the backbone:

    - ``continue``: the earlier adapter is loaded trainable and keeps training (4-bit or not). DPO reference: the
      frozen ``ref`` copy of that adapter (one adapter's memory). Output: one adapter for the original base.
    - ``merge``: the adapter is merged into the full-precision base (never into 4-bit weights), saved once as
      ``<adapter_dir>/merged_base-<hash>`` (safetensors), loaded from there (4-bit if asked) and a new adapter is
      trained. DPO reference: the merged backbone (trl's ``ref`` copies the new adapter, whose LoRA B is zero, so it
      adds exactly nothing; the ``zero_ref_adapter`` speed-up deletes that copy before training). Output: an
      adapter for the merged base, which ``base_model_args`` records.
    - ``reference``: the adapter stays frozen under a new trainable adapter. trl 1.16 activates one adapter at a
      time for the reference pass, so the frozen adapter is merged into the full-precision weights in memory instead
      (exact; nothing written). DPO reference: the backbone with the new adapter inactive, i.e. the earlier model.
      Output: an adapter on top of base + earlier adapter; loading it folds the earlier adapter again. Needs a
      full-precision backbone (ConfigError with load_in_4bit: use merge or continue).

    ``lora_dropout``: with ``continue``, the dropout the continued adapter trains with (None: its own). Dropout
    holds no weights, so it is the one adapter setting a continued adapter can change.

    Without ``use_peft`` (full fine-tuning) the earlier adapter is merged in memory, as for ``reference`` (the DPO
    recipe then has trl score that starting model once as the reference, instead of loading the base a second time).
    """
    quant_args = quant_args or QuantizationArguments()
    adapter_args = adapter_args or AdapterArguments()
    source = source or resolve_source(model_args)
    handoff = model_args.adapter_handoff if source.adapter_dir else None
    if handoff == "merge":
        source = _merged_base(model_args, task, source)
    elif handoff == "reference" or (handoff and not adapter_args.use_peft):
        source = dataclasses.replace(
            source, adapter_dir=None, fold_adapters=[*source.fold_adapters, source.adapter_dir]
        )
    if source.adapter_dir is not None:  # continue: the adapter's modules_to_save restore the trained head
        from alignkit.models.trained import quiet_head_report

        with quiet_head_report():
            model = load_base_model(model_args, quant_args, task, source, **head_kwargs)
    else:
        model = load_base_model(model_args, quant_args, task, source, **head_kwargs)
    if task != "causal_lm":
        # These heads' losses are plain means that ignore num_items_in_batch, yet their forward takes **kwargs: on
        # several ranks transformers' Trainer would then multiply their loss and gradients by the number of ranks.
        model.accepts_loss_kwargs = False
    if tokenizer is not None:
        fit_embeddings(model, tokenizer)
        model.alignkit_new_token_ids = getattr(tokenizer, "alignkit_new_token_ids", None)
    if source.adapter_dir is None:
        model = apply_adapter(
            model, adapter_args, task, quantized=quant_args.load_in_4bit, gradient_checkpointing=gradient_checkpointing
        )
    else:  # continue
        from peft import PeftModel

        if quant_args.load_in_4bit:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs=NON_REENTRANT
            )
        model = PeftModel.from_pretrained(
            model, source.adapter_dir, is_trainable=True, config=_continued_config(source.adapter_dir, lora_dropout)
        )
    if gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    _expose_wrapped_head_bias(model)
    model.alignkit_source = source  # lineage travels with the model to the run loop
    return model


def _continued_config(adapter_dir: str, lora_dropout: float | None):
    """The continued adapter's own config with ``lora_dropout`` in place (peft's ``from_pretrained(config=...)``
    builds the dropout modules from it), or None to load it as saved."""
    if lora_dropout is None:
        return None
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(adapter_dir)
    if getattr(config, "lora_dropout", lora_dropout) == lora_dropout:
        return None
    logger.info("adapter_handoff continue: lora_dropout %g (the adapter had %g)", lora_dropout, config.lora_dropout)
    config.lora_dropout = lora_dropout
    return config


def _expose_wrapped_head_bias(model) -> None:
    """A tied LM head (tie_word_embeddings: SmolLM2, Gemma 3) whose token rows train (trainable_token_indices) is
    wrapped by peft in a ``TrainableTokensWrapper`` that gives ``weight`` (with the trained rows) but no ``bias``;
    trl's fused LM head reads both (AttributeError). Expose the wrapped layer's own bias (None for a tied head)."""
    from peft.utils.other import TrainableTokensWrapper

    for module in model.modules():
        if isinstance(module, TrainableTokensWrapper) and "bias" not in module.__dict__:
            object.__setattr__(module, "bias", getattr(module.original_module, "bias", None))


def _merged_base(model_args, task, source: ModelSource) -> ModelSource:
    """Merge an earlier stage's adapter into its full-precision base, saved once next to the adapter. The folder name
    carries a hash of the adapter weights, so a retrained adapter never reuses a stale merge."""
    adapter = Path(source.adapter_dir)
    digest = hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()[:12]
    merged_dir = adapter / f"merged_base-{digest}"
    if not (merged_dir / "config.json").is_file():
        base_source = ModelSource(base=source.base, fold_adapters=source.fold_adapters)
        merged = _fold(load_base_model(model_args, QuantizationArguments(), task, base_source), [str(adapter)])
        tmp = merged_dir.with_name(f"{merged_dir.name}.tmp{os.getpid()}")
        merged.save_pretrained(tmp, safe_serialization=True)
        try:
            tmp.rename(merged_dir)
        except OSError:  # another rank finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return ModelSource(base=str(merged_dir), parent_run=source.parent_run, lineage=source.lineage)


def fit_embeddings(model, tokenizer) -> None:
    """Grow the embedding matrix when the tokenizer contract added tokens (e.g. a distinct pad token)."""
    emb = model.get_input_embeddings()
    # ds_shape: under ZeRO-3 the weight is a partition placeholder of shape [0]; its real size is kept there.
    if emb is not None and len(tokenizer) > getattr(emb.weight, "ds_shape", emb.weight.shape)[0]:
        if getattr(model, "is_loaded_in_4bit", False):
            from alignkit.data.chat_families import family_hint

            added = tokenizer.convert_ids_to_tokens(list(getattr(tokenizer, "alignkit_new_token_ids", None) or ()))
            what = f"the chat family's marker tokens {', '.join(added)}" if added else "a pad token"
            raise PreflightError(
                "the tokenizer needs more tokens than the 4-bit model's embeddings hold (the tokenizer contract "
                f"added {what}). Fix: train without load_in_4bit, or use tokens "
                "the vocabulary has (an existing pad_token; chat_template: chatml_eos for a vocabulary without "
                f"<|im_end|>{family_hint(tokenizer)})."
            )
        model.resize_token_embeddings(len(tokenizer))


def trainable_parameter_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]
