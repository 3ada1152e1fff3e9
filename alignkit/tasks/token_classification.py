"""Token classification (NER, POS): words + tags in, sub-word label alignment, seqeval entity metrics, grouped
entities out."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from alignkit.data.file_formats import word_line
from alignkit.data.schemas import Schema
from alignkit.errors import ConfigError, DataError
from alignkit.tasks.base import LabelArguments, Labels, Task


def align_labels(
    tag_ids: list[int], word_ids: list[int | None], label_all_tokens: bool, continuation_ids: list[int]
) -> list[int]:
    """One label per token: -100 on special tokens; a word's first sub-token gets the word's tag; later sub-tokens
    get -100, or with ``label_all_tokens`` the tag's continuation (B-X -> I-X)."""
    labels, previous = [], None
    for word in word_ids:
        if word is None:
            labels.append(-100)
        elif word != previous:
            labels.append(tag_ids[word])
        else:
            labels.append(continuation_ids[tag_ids[word]] if label_all_tokens else -100)
        previous = word
    return labels


def encode_words(tokenizer, rows: list[list[str]], max_length: int | None):
    """Tokenize word lists the way :func:`predict` tokenizes raw text: the words joined by single spaces, as one
    string (so a byte-level BPE word gets its leading-space form, and a SentencePiece word its '▁', exactly as
    in running text; ``is_split_into_words`` would tokenize each word alone, and predict() would see other tokens).
    Returns the encoding and, per row, each token's word index (None for special tokens), from the offsets."""
    texts, starts = [], []
    for words in rows:
        text, begin = "", []
        for word in words:
            text += " " if text else ""
            begin.append(len(text))
            text += word
        texts.append(text)
        starts.append(begin)
    enc = tokenizer(texts, truncation=True, max_length=max_length, return_offsets_mapping=True)
    word_ids = []
    for offsets, begin, text in zip(enc.pop("offset_mapping"), starts, texts):
        owner = [-1] * len(text)
        for w, b in enumerate(begin):
            end = begin[w + 1] - 1 if w + 1 < len(begin) else len(text)
            owner[b:end] = [w] * (end - b)
        row = []
        for start, end in offsets:
            hits = [owner[c] for c in range(start, min(end, len(text))) if owner[c] >= 0]
            row.append(hits[-1] if hits and end > start else None)
        word_ids.append(row)
    return enc, word_ids


def report_cut_words(
    tokenizer, rows, features, tokens_column: str, max_length: int, max_fraction: float = 1.0
) -> dict[str, tuple[int, int]]:
    """Warn, per split, how many rows and words ``max_length`` cut (a cut word has no label: in the test split it
    silently leaves the entity F1) and the max_length that keeps every row whole. Returns ``{split: (rows cut,
    words cut)}``; logged before the model loads, so before step 1.

    Raises DataError when a split's share of cut rows is above ``max_fraction`` (the run key
    ``max_truncated_fraction``, as for the stop tokens of SFT/DPO rows)."""
    import logging

    logger = logging.getLogger("alignkit")
    report = {}
    for split in features:
        cut = features[split]["words_cut"]
        rows_cut = sum(1 for c in cut if c > 0)
        report[split] = (rows_cut, sum(cut))
        if rows_cut:
            longest = max(
                len(ids)
                for ids, c in zip(encode_words(tokenizer, rows[split][tokens_column], None)[0]["input_ids"], cut)
                if c > 0
            )
            whole = -(-longest // 8) * 8
            what = (
                f"max_length {max_length} cuts {rows_cut} of {len(cut)} {split} rows ({sum(cut)} words lose their "
                f"tags: {'not scored, so the reported F1 leaves them out' if split == 'test' else 'not trained'})"
            )
            if rows_cut / len(cut) > max_fraction:
                raise DataError(
                    f"{split} split", None, what,
                    f"max_length: {whole} keeps every row whole; or set max_truncated_fraction above "
                    f"{rows_cut / len(cut):.2f} to run with the cut rows",
                )  # fmt: skip
            logger.warning("token_cls: %s. Fix: max_length: %d keeps every row whole", what, whole)
        else:
            lengths = features[split]["full_length"]
            logger.info("token_cls: max_length %d keeps all %d %s rows whole (longest %d tokens)",
                        max_length, len(cut), split, max(lengths, default=0))  # fmt: skip
    return report


def entity_metrics(true_tags: list[list[str]], predicted_tags: list[list[str]]) -> dict[str, float]:
    """seqeval entity-level precision/recall/F1 (CoNLL rules) and token accuracy."""
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

    return {
        "precision": precision_score(true_tags, predicted_tags, zero_division=0),
        "recall": recall_score(true_tags, predicted_tags, zero_division=0),
        "f1": f1_score(true_tags, predicted_tags, zero_division=0),
        "accuracy": accuracy_score(true_tags, predicted_tags),
    }


@dataclass
class TokenClassificationArguments(LabelArguments):
    """token_cls (NER, POS): word lists and their tags."""

    tokens_column: str = field(default="tokens", metadata={"help": "token_cls: the column of word lists."})
    tags_column: str = field(
        default="ner_tags",
        metadata={"help": "token_cls: the column of tag lists (names or ids; numbers are names if all labels are)."},
    )
    label_all_tokens: bool = field(
        default=False,
        metadata={"help": "token_cls: label every sub-token (B- becomes I- after the first) instead of -100."},
    )


class TokenClassification(Task):
    name = "token_cls"
    Arguments = TokenClassificationArguments

    @classmethod
    def inference(cls, recipe) -> dict:
        """``{aggregation_strategy: first}``: the head is trained (and scored) on each word's first sub-token, so
        transformers' token-classification pipeline groups its entities as training did only with 'first'; its
        'simple' (and no aggregation) reads every sub-token's tag, and cuts names whose later pieces were never
        trained into several entities."""
        return {"aggregation_strategy": "first"}

    def __init__(self, args, tokenizer, train_args):
        super().__init__(args, tokenizer, train_args)
        self.labels = Labels(args.label_list, self.name)
        if not tokenizer.is_fast:
            raise ConfigError(
                "token_cls: needs a fast tokenizer (word ids per token). Fix: use a model with a tokenizer.json."
            )
        names = self.labels.names
        self.continuation_ids = [
            self.labels.ids.get("I-" + n[2:], i) if n.startswith("B-") else i for i, n in enumerate(names)
        ]

    @property
    def schema(self) -> Schema:
        tokens_col, tags_col = self.args.tokens_column, self.args.tags_column

        def check_row(row, source, i):
            tokens, tags = row[tokens_col], row[tags_col]
            if not isinstance(tokens, list) or not tokens:
                raise DataError(
                    source,
                    i,
                    f"'{tokens_col}' is empty or not a list of words",
                    "give every row at least one word, or drop it",
                )
            for j, token in enumerate(tokens):
                if not isinstance(token, str) or not token.strip():
                    raise DataError(
                        source, i, f"'{tokens_col}'[{j}] is an empty token", "remove empty strings from the word list"
                    )
                if len(token.split()) != 1:
                    raise DataError(
                        source, i, f"'{tokens_col}'[{j}] {token!r} holds whitespace (predict() splits text into words at "
                        "whitespace, so it would never see this word)", "split it into one word per whitespace-free piece",
                    )  # fmt: skip
            if not isinstance(tags, list) or len(tags) != len(tokens):
                n_tags = len(tags) if isinstance(tags, list) else "no"
                raise DataError(
                    source, i, f"{len(tokens)} words but {n_tags} tags", f"give '{tags_col}' one tag per word"
                )
            for j, tag in enumerate(tags):
                try:
                    self.labels.id_of(tag, source, i, tags_col)
                except DataError as exc:  # named at its word (a CoNLL file: the word's line, not the sentence's)
                    where = word_line(i, j)
                    raise DataError(source, where, f"word {j + 1} {tokens[j]!r}: {exc.problem}", exc.fix) from None

        return Schema(
            self.name,
            ((tokens_col, tags_col),),
            check_row,
            f"give each row '{tokens_col}' (words) and '{tags_col}' (one tag per word)",
        )

    def head_kwargs(self) -> dict:
        return self.labels.head_kwargs()

    def preprocess(self, datasets):
        def features(batch):
            enc, word_ids = encode_words(self.tokenizer, batch[self.args.tokens_column], self.max_length)
            enc["labels"] = [
                align_labels(
                    [self.labels.lookup(t) for t in tags],
                    word_ids[k],
                    self.args.label_all_tokens,
                    self.continuation_ids,
                )
                for k, tags in enumerate(batch[self.args.tags_column])
            ]
            # words max_length cut off each row (they get no label: not trained, not scored), and its full length
            enc["words_cut"] = [
                len(words) - 1 - max((w for w in ids_ if w is not None), default=-1)
                for words, ids_ in zip(batch[self.args.tokens_column], word_ids)
            ]
            enc["full_length"] = [len(ids_) for ids_ in enc["input_ids"]]
            return enc

        out = self._map(datasets, features)
        self.truncation = report_cut_words(
            self.tokenizer, datasets, out, self.args.tokens_column, self.max_length, self.max_truncated_fraction
        )
        return out.remove_columns(["words_cut", "full_length"])

    def collator(self, model):
        from transformers import DataCollatorForTokenClassification

        return DataCollatorForTokenClassification(self.tokenizer)

    def compute_metrics(self, eval_pred) -> dict[str, float]:
        predictions = np.argmax(eval_pred.predictions, axis=-1)
        true_tags, predicted_tags = [], []
        for pred_row, label_row in zip(predictions, eval_pred.label_ids):
            keep = label_row != -100
            true_tags.append([self.labels.names[t] for t in label_row[keep]])
            predicted_tags.append([self.labels.names[p] for p in pred_row[keep]])
        return entity_metrics(true_tags, predicted_tags)


def predict(model, tokenizer, texts: str | list[str], max_length: int | None = None) -> list:
    """Grouped entities per text, in the format of transformers' token-classification pipeline
    (``aggregation_strategy='first'``): ``[{'entity_group': 'PER', 'score': 0.98, 'word': 'Alice Smith',
    'start': 0, 'end': 11}, ...]``; ``start``/``end`` are character offsets into the text, ``score`` the mean over
    the entity's words of the probability of the word's tag.

    Text is split into words at whitespace and encoded by :func:`encode_words`, the encoding training and
    evaluation use, and each word takes the tag predicted at its first sub-token (the one the head was trained on):
    what the reported eval metrics measure is what this returns, for WordPiece, SentencePiece and byte-level BPE
    tokenizers alike (the pipeline's own word grouping differs from training's for byte-level BPE)."""
    import re

    import torch

    single = isinstance(texts, str)
    texts = [texts] if single else list(texts)
    names = [model.config.id2label[i] for i in range(len(model.config.id2label))]
    model.eval()
    results = []
    for text in texts:
        spans = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
        if not spans:
            results.append([])
            continue
        enc, word_ids = encode_words(tokenizer, [[text[a:b] for a, b in spans]], max_length)
        with torch.no_grad():
            logits = model(**{k: torch.tensor(v).to(model.device) for k, v in enc.items()}).logits[0]
        probs = logits.float().softmax(-1).cpu()
        tags = word_tags(probs, word_ids[0], len(spans))
        results.append(_group(tags, spans, text, names))
    return results[0] if single else results


def word_tags(probs, word_ids: list[int | None], n_words: int) -> list[tuple[int, float] | None]:
    """(tag id, probability) per word, from its first sub-token; None for a word truncation cut."""
    tags: list[tuple[int, float] | None] = [None] * n_words
    for position, word in enumerate(word_ids):
        if word is not None and tags[word] is None:
            tag = int(probs[position].argmax())
            tags[word] = (tag, float(probs[position, tag]))
    return tags


def _group(tags, spans, text: str, names: list[str]) -> list[dict]:
    """BIO word tags -> entities (a B- or a changed type starts one; I- of the same type continues it)."""
    entities: list[dict] = []
    current = None
    for tag, (start, end) in zip(tags, spans):
        name = names[tag[0]] if tag else "O"
        kind = name[2:] if name[:2] in ("B-", "I-") else (None if name == "O" else name)
        if kind is None:
            current = None
            continue
        if current is None or name.startswith("B-") or current["entity_group"] != kind:
            current = {"entity_group": kind, "scores": [], "start": start, "end": end}
            entities.append(current)
        current["scores"].append(tag[1])
        current["end"] = end
    return [
        {"entity_group": e["entity_group"], "score": sum(e["scores"]) / len(e["scores"]),
         "word": text[e["start"] : e["end"]], "start": e["start"], "end": e["end"]}
        for e in entities
    ]  # fmt: skip
