"""The distillation teacher (``teacher_model_name_or_path`` of the distill stage): a merged alignkit run, a model
folder, an adapter run (merged in memory), or a model name the model-source table resolves (``tiny:llama``,
``smollm2:SmolLM2-135M-Instruct``, a Hub id).

trl's divergence compares the teacher's and the student's full next-token distributions, so both must index one
vocabulary: :func:`check_teacher` compares the two tokenizers (token -> id) before any weights load, and
:func:`check_same_vocabulary` the two output layers once both are loaded. Both raise ConfigError naming the teacher
and the fix (exit 2), where trl 1.16 would raise a ValueError inside the trainer's constructor.
"""

from __future__ import annotations

from pathlib import Path

from alignkit.errors import ConfigError

KEY = "teacher_model_name_or_path"


def _fix() -> str:
    return (
        "Fix: give a teacher trained from the same base family (one tokenizer), e.g. the merged output of an "
        "alignkit run that started from the student's base (alignkit merge RUN --output DIR)."
    )


def check_teacher(name: str, student_tokenizer):
    """Resolve the teacher ``name`` and compare its tokenizer with ``student_tokenizer`` (the run's, after the chat
    contract), loading no weights. Returns the teacher's tokenizer. ConfigError: not a causal LM (a reward model or
    task head run), or another vocabulary (the count and a few of the differing tokens are named)."""
    from alignkit.config.args import ModelArguments
    from alignkit.models.sources import resolve_source
    from alignkit.models.tokenizer import load_tokenizer
    from alignkit.runs import RunRecord

    if Path(name).is_dir() and (record := RunRecord.for_model(name)) is not None:
        last = record.last
        if last is not None and (last.task or "causal_lm") != "causal_lm":
            raise ConfigError(
                f"{KEY}: '{name}' is a {last.stage} run with a {last.task} head, not a causal language model. Fix: "
                "name a causal LM (an sft/dpo/... run, merged, or a model folder) as the teacher."
            )
    model_args = ModelArguments(model_name_or_path=name)
    try:
        source = resolve_source(model_args)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("model_name_or_path", KEY, 1)) from None
    teacher_tokenizer = load_tokenizer(model_args, source=source)
    added = set(getattr(student_tokenizer, "alignkit_new_token_ids", None) or ())  # the run's own: compared by rows
    student = {t: i for t, i in student_tokenizer.get_vocab().items() if i not in added}
    teacher = teacher_tokenizer.get_vocab()
    teacher = {t: i for t, i in teacher.items() if i not in added or student_tokenizer.convert_ids_to_tokens(i) != t}
    if student != teacher:
        differ = sorted(set(student.items()) ^ set(teacher.items()), key=lambda kv: kv[1])
        shown = ", ".join(repr(token) for token, _ in differ[:4])
        raise ConfigError(
            f"{KEY}: '{name}' has another vocabulary than the student ({len(teacher)} vs {len(student)} tokens; "
            f"{len(differ)} token/id pairs differ, e.g. {shown}). Distillation compares the two models' next-token "
            f"distributions token by token, so both must use one tokenizer. {_fix()}"
        )
    return teacher_tokenizer


def load_teacher(name: str, dtype: str = "float32"):
    """The teacher as a frozen causal LM in eval mode (an adapter run is merged into its base in memory), in
    ``dtype`` (full precision by default: it is never trained)."""
    from alignkit.models.trained import load_trained

    model, _ = load_trained(name, merge=True, dtype=dtype)
    model.requires_grad_(False)
    return model.eval()


def check_same_vocabulary(teacher, student, name: str) -> None:
    """The teacher's and the student's output layers have the same number of rows (ConfigError otherwise): tokens
    the run added to the student (a family's end-of-turn, a pad) that the teacher lacks."""
    rows_t = teacher.get_output_embeddings().weight.shape[0]
    rows_s = student.get_output_embeddings().weight.shape[0]
    if rows_t != rows_s:
        raise ConfigError(
            f"{KEY}: '{name}' predicts {rows_t} tokens, the student {rows_s}: the same tokenizer, but the run resized "
            f"the student's embeddings (tokens its chat format added). {_fix()}"
        )
