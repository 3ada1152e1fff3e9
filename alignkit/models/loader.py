"""One backbone loader for every task: full precision or 4-bit (bitsandbytes nf4), with or without a PEFT adapter.

Pure functions turn config groups into objects (``get_quantization_config``, ``get_peft_config``), as trl's
scripts do; ``load_model`` composes them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alignkit.config.args import AdapterArguments, ModelArguments, QuantizationArguments, device_supports_bf16
from alignkit.errors import ConfigError, PreflightError

logger = logging.getLogger(__name__)

RUN_METADATA = "alignkit_run.json"

# Auto class and the head modules per task. Heads stay out of 4-bit (bnb asserts in their forward otherwise) and,
# when freshly initialised, are trained in full next to the adapter (PEFT ``modules_to_save``).
TASK_HEADS: dict[str, tuple[str, tuple[str, ...], bool]] = {
    # task: (transformers auto class, head module names, head is new and must be trained)
    "causal_lm": ("AutoModelForCausalLM", ("lm_head",), False),
    "seq_cls": ("AutoModelForSequenceClassification", ("classifier", "score"), True),
    "token_cls": ("AutoModelForTokenClassification", ("classifier", "score"), True),
    "qa": ("AutoModelForQuestionAnswering", ("qa_outputs",), True),
    "mlm": ("AutoModelForMaskedLM", ("cls", "lm_head", "vocab_projector"), False),
    "seq2seq": ("AutoModelForSeq2SeqLM", ("lm_head",), False),
}
PEFT_TASK_TYPES = {
    "causal_lm": "CAUSAL_LM",
    "seq_cls": "SEQ_CLS",
    "token_cls": "TOKEN_CLS",
    "qa": "QUESTION_ANS",
    "mlm": None,
    "seq2seq": "SEQ_2_SEQ_LM",
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelSource:
    """Where the weights really come from, after resolving tiny:, GGUF files and alignkit adapter outputs."""

    base: str
    gguf_file: str | None = None
    adapter_dir: str | None = None  # an alignkit/PEFT adapter to hand off from
    parent_run: dict[str, Any] | None = None  # alignkit_run.json of that adapter's run (lineage)
    lineage: list[dict[str, Any]] = field(default_factory=list)


def resolve_dtype(name: str) -> torch.dtype:
    """'auto' is bf16 on GPUs that support it and fp32 everywhere else (bf16 on CPUs without bf16 units is slow)."""
    if name == "auto":
        return torch.bfloat16 if device_supports_bf16() else torch.float32
    return _DTYPES[name]


def resolve_source(model_args: ModelArguments) -> ModelSource:
    name = model_args.model_name_or_path
    if not name:
        raise ConfigError("model_name_or_path: required.")
    if name.startswith("tiny:"):
        from alignkit.testing.tiny import tiny_model_path

        try:
            return ModelSource(base=str(tiny_model_path(name.split(":", 1)[1])))
        except ValueError as exc:
            raise ConfigError(f"model_name_or_path: {exc}") from exc
    path = Path(name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConfigError(f"model_name_or_path: GGUF file {path} not found.")
        return ModelSource(base=str(path.parent), gguf_file=path.name)
    if path.is_dir() and (path / "adapter_config.json").is_file():
        adapter_cfg = json.loads((path / "adapter_config.json").read_text())
        parent = json.loads((path / RUN_METADATA).read_text()) if (path / RUN_METADATA).is_file() else None
        base_args = ModelArguments(**{**model_args.__dict__, "model_name_or_path": adapter_cfg["base_model_name_or_path"]})
        if parent and parent.get("base_model_args"):  # the base as the parent run loaded it (GGUF file, tiny: name)
            base_args.model_name_or_path = parent["base_model_args"]["model_name_or_path"]
            base_args.gguf_file = parent["base_model_args"].get("gguf_file")
        base = resolve_source(base_args)
        lineage = list(parent.get("lineage", [])) if parent else []
        return ModelSource(base=base.base, gguf_file=base.gguf_file, adapter_dir=str(path), parent_run=parent, lineage=lineage)
    if path.is_dir() and (path / RUN_METADATA).is_file():
        parent = json.loads((path / RUN_METADATA).read_text())  # a merged/full alignkit output: a plain model
        return ModelSource(base=str(path), gguf_file=model_args.gguf_file, parent_run=parent, lineage=list(parent.get("lineage", [])))
    return ModelSource(base=name, gguf_file=model_args.gguf_file)


def get_quantization_config(quant_args: QuantizationArguments, task: str = "causal_lm"):
    """BitsAndBytesConfig for a 4-bit backbone, or None. The task's head is kept out of quantization."""
    if not quant_args.load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig

    compute_dtype = resolve_dtype(quant_args.bnb_4bit_compute_dtype)
    storage = quant_args.bnb_4bit_quant_storage or "uint8"
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_args.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=quant_args.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=getattr(torch, storage),
        # Replacing the default skip list drops transformers' own (lm_head), so name it again.
        llm_int8_skip_modules=sorted(set(TASK_HEADS[task][1]) | {"lm_head"}),
    )


def get_peft_config(adapter_args: AdapterArguments, task: str = "causal_lm"):
    """LoraConfig from the adapter args; new task heads are trained in full via ``modules_to_save``."""
    if not adapter_args.use_peft:
        return None
    from peft import LoraConfig

    _, heads, head_is_new = TASK_HEADS[task]
    modules_to_save = list(adapter_args.lora_modules_to_save or [])
    if head_is_new:
        modules_to_save += [h for h in heads if h not in modules_to_save]
    return LoraConfig(
        r=adapter_args.lora_r,
        lora_alpha=adapter_args.lora_alpha,
        lora_dropout=adapter_args.lora_dropout,
        target_modules=adapter_args.lora_target_modules,
        modules_to_save=modules_to_save or None,
        use_dora=adapter_args.use_dora,
        use_rslora=adapter_args.use_rslora,
        task_type=PEFT_TASK_TYPES[task],
        bias="none",
    )


def _check_weights_format(source: ModelSource, allow_pickle: bool) -> None:
    """Safetensors only, unless the recipe allows pickle weights (which can run arbitrary code on load)."""
    base = Path(source.base)
    if allow_pickle or source.gguf_file or not base.is_dir():
        return
    names = {p.name for p in base.iterdir()}
    has_safe = any(n.endswith(".safetensors") for n in names)
    has_pickle = any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in names)
    if has_pickle and not has_safe:
        raise PreflightError(
            f"{base}: holds only pickle weights (.bin/.pt), which can run code when loaded. Fix: convert them to "
            "safetensors, or set allow_pickle_weights: true if you trust the files."
        )


def _auto_class(task: str):
    import transformers

    return getattr(transformers, TASK_HEADS[task][0])


def load_config(model_args: ModelArguments, source: ModelSource | None = None, **config_kwargs):
    from transformers import AutoConfig

    source = source or resolve_source(model_args)
    kwargs: dict[str, Any] = {"trust_remote_code": model_args.trust_remote_code, "revision": model_args.revision}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    config = AutoConfig.from_pretrained(source.base, **kwargs, **config_kwargs)
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
    auto = _auto_class(task)
    dtype = resolve_dtype(quant_args.bnb_4bit_compute_dtype if quant_args.load_in_4bit else model_args.dtype)
    config = load_config(model_args, source, **head_kwargs)
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
        kwargs["attn_implementation"] = model_args.attn_implementation
    if source.gguf_file:
        from transformers import GgufConfig

        kwargs["gguf_file"] = source.gguf_file
        kwargs["use_safetensors"] = None
        if not quant_args.load_in_4bit:
            kwargs["quantization_config"] = GgufConfig(dequantize=True)
    quantization_config = get_quantization_config(quant_args, task)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    try:
        return auto.from_pretrained(source.base, **kwargs)
    except OSError as exc:
        raise PreflightError(
            f"model_name_or_path: could not load '{model_args.model_name_or_path}' ({exc}). Fix: point it at a local "
            "model directory or .gguf file; Hub ids need network access."
        ) from exc


def apply_adapter(model, adapter_args: AdapterArguments, task: str, *, quantized: bool, gradient_checkpointing: bool = False):
    """Prepare a (possibly 4-bit) model for training and wrap it with a fresh PEFT adapter."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    peft_config = get_peft_config(adapter_args, task)
    if peft_config is None:
        return model
    _check_target_modules(model, peft_config)
    return get_peft_model(model, peft_config)


def _check_target_modules(model, peft_config) -> None:
    targets = peft_config.target_modules
    if targets in (None, "all-linear") or isinstance(targets, str):
        return
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(
            f"lora_target_modules: {missing} not found in the model. Fix: use 'all-linear' or some of {linear}."
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
    **head_kwargs,
):
    """Load the backbone for ``task`` (4-bit if asked) and attach the adapter the recipe asks for.

    When ``model_name_or_path`` is an adapter output of an earlier stage, ``adapter_handoff`` decides what happens:
    ``continue`` keeps training it, ``merge`` merges it into the base first and trains a new adapter, ``reference``
    loads it frozen under the name ``reference`` and adds a new trainable adapter (the DPO stage uses it as the
    reference policy).
    """
    quant_args = quant_args or QuantizationArguments()
    adapter_args = adapter_args or AdapterArguments()
    source = source or resolve_source(model_args)
    quantized = quant_args.load_in_4bit
    if source.adapter_dir and model_args.adapter_handoff == "merge":
        source = _merged_base(model_args, quant_args, task, source)
    model = load_base_model(model_args, quant_args, task, source, **head_kwargs)
    if tokenizer is not None:
        _fit_embeddings(model, tokenizer)
    if source.adapter_dir is None or not adapter_args.use_peft:
        model = apply_adapter(model, adapter_args, task, quantized=quantized, gradient_checkpointing=gradient_checkpointing)
    else:
        from peft import PeftModel

        if quantized:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        if model_args.adapter_handoff == "continue":
            model = PeftModel.from_pretrained(model, source.adapter_dir, is_trainable=True)
        else:  # reference: the earlier adapter frozen as 'reference', a new trainable one as 'default'
            model = PeftModel.from_pretrained(model, source.adapter_dir, adapter_name="reference", is_trainable=False)
            model.add_adapter("default", get_peft_config(adapter_args, task))
            model.set_adapter("default")
    if gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    model.alignkit_source = source  # lineage travels with the model to the run loop
    return model


def _merged_base(model_args, quant_args, task, source: ModelSource) -> ModelSource:
    """Merge an earlier stage's adapter into its full-precision base, saved once next to the adapter."""
    from peft import PeftModel

    merged_dir = Path(source.adapter_dir) / "merged_base"
    if not (merged_dir / "config.json").is_file():
        base = load_base_model(model_args, QuantizationArguments(), task, ModelSource(base=source.base, gguf_file=source.gguf_file))
        merged = PeftModel.from_pretrained(base, source.adapter_dir).merge_and_unload()
        tmp = merged_dir.with_name("merged_base.tmp")
        merged.save_pretrained(tmp, safe_serialization=True)
        tmp.rename(merged_dir)
    return ModelSource(base=str(merged_dir), adapter_dir=None, parent_run=source.parent_run, lineage=source.lineage)


def _fit_embeddings(model, tokenizer) -> None:
    """Grow the embedding matrix when the tokenizer contract added tokens (e.g. a distinct pad token)."""
    emb = model.get_input_embeddings()
    if emb is not None and len(tokenizer) > emb.weight.shape[0]:
        if getattr(model, "is_loaded_in_4bit", False):
            raise PreflightError(
                "the tokenizer needs more tokens than the 4-bit model's embeddings hold. Fix: pick an existing token "
                "as pad_token, or train without load_in_4bit."
            )
        model.resize_token_embeddings(len(tokenizer))


def trainable_parameter_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def adapter_dtype_fix(model, dtype: torch.dtype | None = None) -> None:
    """trl casts QLoRA adapter weights to bf16; on devices without fast bf16 keep them in the compute dtype."""
    dtype = dtype or resolve_dtype("auto")
    for _, param in model.named_parameters():
        if param.requires_grad and param.dtype != dtype and param.is_floating_point():
            param.data = param.data.to(dtype)
