"""Model heads: one row per head, everything the loader needs to know about it. A new task head is this row plus
its task module in ``alignkit/tasks/`` (which names the row by ``Task.name``)."""

from __future__ import annotations

from dataclasses import dataclass

from alignkit.errors import ConfigError, suggest


@dataclass(frozen=True)
class Head:
    """``auto_class``: the transformers auto class. ``modules``: the head's module names, kept out of 4-bit
    quantization (bitsandbytes asserts in their forward otherwise). ``new``: the head is freshly initialised on a
    pretrained backbone, so it is trained in full next to the adapter (PEFT ``modules_to_save``). ``peft_task_type``:
    PEFT's ``TaskType`` name (None: PEFT has none, the adapter wraps the model as it is). ``pipeline``: the
    ``transformers.pipeline`` task a merged model of this head loads into (None: transformers 5 has none, e.g. its
    question-answering and text2text pipelines were removed)."""

    name: str
    auto_class: str
    modules: tuple[str, ...]
    new: bool
    peft_task_type: str | None
    pipeline: str | None = None

    def auto(self):
        import transformers

        return getattr(transformers, self.auto_class)


HEADS: dict[str, Head] = {
    h.name: h
    for h in (
        Head("causal_lm", "AutoModelForCausalLM", ("lm_head",), False, "CAUSAL_LM", "text-generation"),
        # pooler / pre_classifier feed the classifier and are new in checkpoints saved without them (MLM-only BERTs,
        # DistilBERT)
        Head(
            "seq_cls",
            "AutoModelForSequenceClassification",
            ("classifier", "score", "pooler.dense", "pre_classifier"),
            True,
            "SEQ_CLS",
            "text-classification",
        ),
        Head(
            "token_cls",
            "AutoModelForTokenClassification",
            ("classifier", "score"),
            True,
            "TOKEN_CLS",
            "token-classification",
        ),
        Head("qa", "AutoModelForQuestionAnswering", ("qa_outputs",), True, "QUESTION_ANS"),
        Head("mlm", "AutoModelForMaskedLM", ("cls", "lm_head", "vocab_projector"), False, None, "fill-mask"),
        Head("seq2seq", "AutoModelForSeq2SeqLM", ("lm_head",), False, "SEQ_2_SEQ_LM"),
        # sentence embeddings (alignkit.tasks.embedding): the bare encoder, pooled by sentence-transformers' modules;
        # BERT's pooler is unused, and new (so never 4-bit) in checkpoints saved without it
        Head("embedding", "AutoModel", ("pooler.dense",), False, "FEATURE_EXTRACTION"),
    )
}


def get_head(name: str) -> Head:
    if name not in HEADS:
        raise ConfigError(f"task: unknown model head '{name}'.{suggest(name, HEADS)} Fix: use one of {sorted(HEADS)}.")
    return HEADS[name]


def has_head(head: Head, config) -> bool:
    """transformers has ``head``'s auto class for ``config``'s model type (Gemma 3: seq_cls yes, token_cls/qa no)."""
    mapping = getattr(head.auto(), "_model_mapping", None)
    return mapping is None or type(config) in mapping


def check_head_exists(config, task: str, model_name: str) -> None:
    """ConfigError naming the missing head, before anything loads, when transformers has no ``task`` head for this
    model type (rather than transformers' 'Unrecognized configuration class' traceback)."""
    head = get_head(task)
    if has_head(head, config):
        return
    have = [h.name for h in HEADS.values() if h.name != "embedding" and has_head(h, config)]
    raise ConfigError(
        f"task: transformers has no {head.auto_class} for '{model_name}' (model type {config.model_type}), so there "
        f"is no {task} head to train. Fix: use a model type that has one (Llama, BERT, ...), or a task this model has "
        f"a head for: {have}."
    )
