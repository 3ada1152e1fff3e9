"""Extractive question answering (SQuAD format): long contexts split into overlapping windows (stride + offset
mapping), start/end token labels, n-best post-processing back to context spans, exact match and F1."""

from __future__ import annotations

import collections
import re
import string
from dataclasses import dataclass, field

import numpy as np

from alignkit.data.schemas import Schema
from alignkit.errors import ConfigError, DataError
from alignkit.tasks.base import Task, require_text

QA_COLUMNS = ("question", "context", "answers")
_PUNCTUATION = set(string.punctuation)


def _check_row(row, source, i, allow_unanswerable: bool = False):
    require_text(row["question"], source, i, "question")
    require_text(row["context"], source, i, "context")
    answers, context = row["answers"], row["context"]
    fix = 'write answers as {"text": ["..."], "answer_start": [character offset in context]}'
    if (
        not isinstance(answers, dict)
        or not isinstance(answers.get("text"), list)
        or not isinstance(answers.get("answer_start"), list)
    ):
        raise DataError(source, i, "'answers' is not a SQuAD answers object", fix)
    if len(answers["text"]) != len(answers["answer_start"]):
        raise DataError(source, i, "'answers' needs as many answer_start values as texts", fix)
    if not answers["text"] and not allow_unanswerable:
        raise DataError(
            source, i, "'answers' is empty: an unanswerable question (SQuAD v2)",
            "set version_2_with_negative: true to train and score the null answer, or give the row its answer",
        )  # fmt: skip
    for text, start in zip(answers["text"], answers["answer_start"]):
        if not isinstance(text, str) or not text.strip():
            raise DataError(
                source, i, "an answer text is empty", "give every answer its text as it appears in the context"
            )
        if not isinstance(start, int) or context[start : start + len(text)] != text:
            places = [m.start() for m in re.finditer(re.escape(text), context)]
            near = start if isinstance(start, int) else 0
            found = min(places, key=lambda p: abs(p - near)) if places else -1
            hint = (
                f"set answer_start to {found}, where the text occurs"
                + (f" nearest to {start} ({len(places)} places in all)" if len(places) > 1 else "")
                if found >= 0
                else "the answer text does not occur in the context; copy it from the context"
            )
            raise DataError(
                source, i, f"answer_start {start} does not point at the answer text {text!r} in the context", hint
            )


def window_features(tokenizer, questions, contexts, answers, max_length: int, doc_stride: int):
    """Tokenize (question, context) pairs into windows. Each window gets start/end token positions of the first
    answer (0, 0 when the answer is not inside it), its example index and offsets (None outside the context)."""
    enc = tokenizer(
        [q.strip() for q in questions],
        contexts,
        truncation="only_second",
        max_length=max_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    example_of = enc.pop("overflow_to_sample_mapping")
    starts, ends, offsets_out = [], [], []
    for k, offsets in enumerate(enc["offset_mapping"]):
        seq_ids = enc.sequence_ids(k)
        context_tokens = [j for j, s in enumerate(seq_ids) if s == 1]
        first, last = context_tokens[0], context_tokens[-1]
        answer = answers[example_of[k]]
        start_char = answer["answer_start"][0] if answer["text"] else -1  # unanswerable: the null span (0, 0)
        end_char = start_char + len(answer["text"][0]) if answer["text"] else -1
        if not answer["text"] or offsets[first][0] > start_char or offsets[last][1] < end_char:
            starts.append(0)
            ends.append(0)
        else:
            start = first
            while start <= last and offsets[start][0] <= start_char:
                start += 1
            end = last
            while end >= first and offsets[end][1] >= end_char:
                end -= 1
            starts.append(start - 1)
            ends.append(end + 1)
        offsets_out.append([tuple(o) if seq_ids[j] == 1 else None for j, o in enumerate(offsets)])
    enc["start_positions"], enc["end_positions"] = starts, ends
    enc["offset_mapping"], enc["example_index"] = offsets_out, list(example_of)
    return enc


def postprocess_qa(
    contexts, example_index, offsets, start_logits, end_logits, n_best_size=20, max_answer_length=30,
    null_score_diff_threshold: float | None = None, spans: bool = False,
) -> list:  # fmt: skip
    """The best-scoring span per example: over its windows, the ``n_best_size`` top starts x ends that lie inside the
    context, in order, and no longer than ``max_answer_length`` tokens, scored by start + end logit.

    ``null_score_diff_threshold`` (SQuAD v2; None: every question has an answer): the answer is ``""`` when the null
    score (start + end logit of the first token, the lowest over the example's windows) exceeds the best span's score
    by more than the threshold, as transformers' ``examples/pytorch/question-answering/utils_qa.py`` decides.

    Returns the answer texts, or with ``spans`` ``(text, start char, end char, score)`` per example (``("", 0, 0,
    null score)`` for no answer)."""
    windows = collections.defaultdict(list)
    for k, example in enumerate(example_index):
        windows[example].append(k)
    answers = []
    for i, context in enumerate(contexts):
        best, best_score, null_score, where = "", -np.inf, np.inf, (0, 0)
        for k in windows[i]:
            window_offsets = offsets[k]
            null_score = min(null_score, float(start_logits[k][0] + end_logits[k][0]))
            top_starts = np.argsort(start_logits[k])[::-1][:n_best_size]
            top_ends = np.argsort(end_logits[k])[::-1][:n_best_size]
            for s in top_starts:
                for e in top_ends:
                    if (
                        s >= len(window_offsets)
                        or e >= len(window_offsets)
                        or window_offsets[s] is None
                        or window_offsets[e] is None
                    ):
                        continue
                    if e < s or e - s + 1 > max_answer_length:
                        continue
                    score = start_logits[k][s] + end_logits[k][e]
                    if score > best_score:
                        best, best_score = context[window_offsets[s][0] : window_offsets[e][1]], score
                        where = (window_offsets[s][0], window_offsets[e][1])
        if null_score_diff_threshold is not None and null_score - best_score > null_score_diff_threshold:
            best, best_score, where = "", null_score, (0, 0)
        answers.append((best, *where, float(best_score)) if spans else best)
    return answers


def _normalize(text: str) -> str:
    """SQuAD's answer normalization: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def _f1(prediction: str, gold: str) -> float:
    pred, ref = _normalize(prediction).split(), _normalize(gold).split()
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if not pred or not ref:
        return float(pred == ref)
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: list[str], gold_answers: list[list[str]]) -> dict[str, float]:
    """SQuAD exact match and token F1 in percent, each the best over an example's gold answers (an unanswerable
    question's gold is the empty answer, as in the SQuAD v2 evaluation script)."""
    gold_answers = [golds or [""] for golds in gold_answers]
    exact = [max(float(_normalize(p) == _normalize(g)) for g in golds) for p, golds in zip(predictions, gold_answers)]
    f1 = [max(_f1(p, g) for g in golds) for p, golds in zip(predictions, gold_answers)]
    return {"exact_match": 100 * float(np.mean(exact)), "f1": 100 * float(np.mean(f1))}


def report_windows(rows, windows, max_length: int, doc_stride: int) -> dict[str, tuple[int, int]]:
    """Log, per split, how many contexts ``max_length`` splits into several windows and warn how many answers lie in
    no single window (cut by every window's edge: such a question trains only the null answer, and can never be
    answered). Returns ``{split: (examples split, answers in no window)}``. Runs before the model loads."""
    import logging

    logger = logging.getLogger("alignkit")
    report = {}
    for split in windows:
        per_example = collections.Counter(windows[split]["example_index"])
        found = collections.Counter(
            e for e, s in zip(windows[split]["example_index"], windows[split]["start_positions"]) if s > 0
        )
        answered = [i for i, a in enumerate(rows[split]["answers"]) if a["text"]]
        lost = sum(1 for i in answered if not found[i])
        split_up = sum(1 for n in per_example.values() if n > 1)
        report[split] = (split_up, lost)
        logger.info(
            "qa: max_length %d / doc_stride %d: %d of %d %s contexts span several windows (%d windows in all)",
            max_length, doc_stride, split_up, len(rows[split]), split, len(windows[split]),
        )  # fmt: skip
        if lost:
            logger.warning(
                "qa: %d of %d %s answers lie in no single window of max_length %d (doc_stride %d): %s. Fix: raise "
                "max_length (e.g. 384, doc_stride 128: the SQuAD defaults) or doc_stride", lost, len(answered), split,
                max_length, doc_stride, "they train only the null answer" if split == "train" else "scored as missed",
            )  # fmt: skip
    return report


@dataclass
class QuestionAnsweringArguments:
    """qa: extractive question answering over windows of long contexts."""

    doc_stride: int = field(
        default=128, metadata={"help": "qa: tokens shared by consecutive windows of a long context."}
    )
    n_best_size: int = field(default=20, metadata={"help": "qa: start/end candidates per window in post-processing."})
    max_answer_length: int = field(default=30, metadata={"help": "qa: longest answer span, in tokens."})
    version_2_with_negative: bool = field(
        default=False,
        metadata={"help": "qa: some questions have no answer (SQuAD v2: empty answers); predict the null answer too."},
    )
    null_score_diff_threshold: float = field(
        default=0.0,
        metadata={"help": "qa, version_2_with_negative: predict no answer when null score - best span score > this."},
    )

    def __post_init__(self):
        if self.doc_stride <= 0 or self.n_best_size <= 0 or self.max_answer_length <= 0:
            raise ConfigError(
                "doc_stride, n_best_size and max_answer_length must be positive. Fix: e.g. doc_stride: 128, "
                "n_best_size: 20, max_answer_length: 30 (the defaults)."
            )


class QuestionAnswering(Task):
    name = "qa"
    Arguments = QuestionAnsweringArguments

    @classmethod
    def inference(cls, recipe) -> dict:
        """The windows and post-processing the run trained and scored with (:func:`predict` reads them back)."""
        args = recipe.group(cls.Arguments)
        return {
            "max_length": recipe.train.max_length, "doc_stride": args.doc_stride, "n_best_size": args.n_best_size,
            "max_answer_length": args.max_answer_length,
            "null_score_diff_threshold": args.null_score_diff_threshold if args.version_2_with_negative else None,
        }  # fmt: skip

    def __init__(self, args, tokenizer, train_args):
        super().__init__(args, tokenizer, train_args)
        if not tokenizer.is_fast:
            raise ConfigError("qa: needs a fast tokenizer (offset mapping). Fix: use a model with a tokenizer.json.")
        if args.doc_stride >= self.max_length // 2:
            raise ConfigError(
                f"doc_stride {args.doc_stride} must be below half of max_length {self.max_length}. Fix: lower doc_stride."
            )

    @property
    def schema(self) -> Schema:
        v2 = self.args.version_2_with_negative
        return Schema(
            self.name,
            (QA_COLUMNS,),
            lambda row, source, i: _check_row(row, source, i, v2),
            "give each row 'question', 'context' and SQuAD 'answers' (or use format: squad for a SQuAD JSON file)",
        )

    def preprocess(self, datasets):
        def features(batch, indices):
            enc = window_features(
                self.tokenizer,
                batch["question"],
                batch["context"],
                batch["answers"],
                self.max_length,
                self.args.doc_stride,
            )
            enc["example_index"] = [indices[j] for j in enc["example_index"]]
            return enc

        windows = datasets.map(
            features, batched=True, with_indices=True, remove_columns=datasets["train"].column_names, desc="qa windows"
        )
        self.truncation = report_windows(datasets, windows, self.max_length, self.args.doc_stride)
        if "test" in windows:  # post-processing maps eval windows back to their examples' contexts
            self.eval_contexts = list(datasets["test"]["context"])
            self.eval_answers = [a["text"] for a in datasets["test"]["answers"]]
            self.eval_offsets, self.eval_example_index = (
                list(windows["test"]["offset_mapping"]),
                list(windows["test"]["example_index"]),
            )
        return windows.remove_columns(["offset_mapping", "example_index"])

    def collator(self, model):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(self.tokenizer)

    def compute_metrics(self, eval_pred) -> dict[str, float]:
        start_logits, end_logits = eval_pred.predictions[:2]
        predictions = postprocess_qa(
            self.eval_contexts,
            self.eval_example_index,
            self.eval_offsets,
            start_logits,
            end_logits,
            self.args.n_best_size,
            self.args.max_answer_length,
            self.args.null_score_diff_threshold if self.args.version_2_with_negative else None,
        )
        return squad_metrics(predictions, self.eval_answers)


_PREDICT_DEFAULTS = {"max_length": 384, "doc_stride": 128, "n_best_size": 20, "max_answer_length": 30,
                     "null_score_diff_threshold": None}  # fmt: skip


def run_settings(model, run: str | None = None) -> dict:
    """The QA settings a trained model was trained and scored with: the ``inference`` of the last qa stage in the
    ``alignkit_run.json`` of ``run`` (default: the folder the model was loaded from: ``load_trained``'s run folder,
    else ``model.name_or_path``; a merged model's record keeps its run's lineage). {} when there is no such record (a model trained elsewhere)."""
    from alignkit.runs import RunRecord

    folder = run or getattr(model, "alignkit_trained_from", None) or getattr(model, "name_or_path", None)
    if not folder:
        return {}
    try:
        record = RunRecord.for_model(folder)
    except Exception:  # an unreadable record: the caller's arguments or the SQuAD defaults
        return {}
    for entry in reversed(record.lineage if record else []):
        if entry.inference:
            return dict(entry.inference)
    return {}


def predict(
    model, tokenizer, question: str, context: str, max_length: int | None = None, doc_stride: int | None = None,
    n_best_size: int | None = None, max_answer_length: int | None = None,
    null_score_diff_threshold: float | None = None, run: str | None = None,
) -> dict:  # fmt: skip
    """The answer span of ``question`` in ``context``, in the format transformers 4's question-answering pipeline
    returned (transformers 5 removed that pipeline): ``{'answer': str, 'start': int, 'end': int, 'score': float}``
    with ``start``/``end`` character offsets into ``context`` and ``score`` the span's start + end logit. Windows
    and post-processing are the ones training's evaluation uses (:func:`window_features`, :func:`postprocess_qa`)
    with the run's own settings: each argument left None is read from the run record (:func:`run_settings`: the
    model's folder, or ``run``), else SQuAD's 384/128 windows, 20 candidates, 30-token answers. A SQuAD v2 run's
    ``null_score_diff_threshold`` makes an empty answer mean none."""
    import torch

    given = {"max_length": max_length, "doc_stride": doc_stride, "n_best_size": n_best_size,
             "max_answer_length": max_answer_length, "null_score_diff_threshold": null_score_diff_threshold}  # fmt: skip
    recorded = run_settings(model, run)
    settings = {k: v if v is not None else recorded.get(k, _PREDICT_DEFAULTS[k]) for k, v in given.items()}
    max_length, doc_stride = settings["max_length"], settings["doc_stride"]
    enc = window_features(tokenizer, [question], [context], [{"text": [], "answer_start": []}], max_length, doc_stride)
    offsets, example_index = enc.pop("offset_mapping"), enc.pop("example_index")
    features = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
    # a long context's last window is shorter: padded on the right, as training's collator pads (positions count
    # from the left, so the offsets still point at the same tokens)
    inputs = {k: v.to(model.device) for k, v in tokenizer.pad(features, padding=True, return_tensors="pt").items()}
    model.eval()
    with torch.no_grad():
        out = model(**inputs)
    answer, start, end, score = postprocess_qa(
        [context], example_index, offsets, out.start_logits.float().cpu().numpy(), out.end_logits.float().cpu().numpy(),
        settings["n_best_size"], settings["max_answer_length"], settings["null_score_diff_threshold"], spans=True,
    )[0]  # fmt: skip
    return {"answer": answer, "start": start, "end": end, "score": score}
