"""Sequence-to-sequence translation and summarization (encoder-decoder models): target tokenization, generation at
eval (``predict_with_generate``), BLEU (sacrebleu) and ROUGE (rouge-score)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from alignkit.data.schemas import Schema
from alignkit.tasks.base import Task, require_text

logger = logging.getLogger(__name__)


def text_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU (sacrebleu, 0-100) and mean ROUGE-1/2/L F-measures (rouge-score, 0-1, with stemming)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
    rouge = {key: float(np.mean([s[key].fmeasure for s in scores])) for key in ("rouge1", "rouge2", "rougeL")}
    return {"bleu": sacrebleu.corpus_bleu(predictions, [references]).score, **rouge}


@dataclass
class Seq2SeqArguments:
    """seq2seq: source text to target text (translation, summarisation)."""

    source_column: str = field(default="source", metadata={"help": "seq2seq: the input text column."})
    target_column: str = field(default="target", metadata={"help": "seq2seq: the output text column."})
    source_prefix: str = field(
        default="", metadata={"help": "seq2seq: text put before every source (T5: 'translate ...: ')."}
    )
    max_target_length: int = field(
        default=128,
        metadata={
            "help": "seq2seq: max target tokens; also how long predictions may grow (predict_with_generate) unless "
            "generation_max_length is set."
        },
    )


class Seq2Seq(Task):
    name = "seq2seq"
    Arguments = Seq2SeqArguments
    generates = True

    def __init__(self, args, tokenizer, train_args):
        super().__init__(args, tokenizer, train_args)
        if not train_args.predict_with_generate:
            self.compute_metrics = None  # without generation there is no text to score; eval reports the loss

    @classmethod
    def configure(cls, recipe) -> None:
        """``generation_max_length`` unset with ``predict_with_generate``: transformers would generate up to the
        model's ``generation_config.max_length`` (20 by default) and the metrics would score cut text, so it becomes
        ``max_target_length`` + 1 (the decoder start token), in the recipe (the saved config says what ran)."""
        train, args = recipe.train, recipe.extra[1]
        if train.predict_with_generate and train.generation_max_length is None:
            train.generation_max_length = args.max_target_length + 1
            logger.info(
                "seq2seq: generation_max_length unset: predictions may run to max_target_length %d tokens",
                args.max_target_length,
            )

    @property
    def schema(self) -> Schema:
        columns = (self.args.source_column, self.args.target_column)

        def check_row(row, source, i):
            for column in columns:
                require_text(row[column], source, i, column)

        return Schema(self.name, (columns,), check_row, f"give each row '{columns[0]}' and '{columns[1]}'")

    def preprocess(self, datasets):
        def features(batch):
            sources = [self.args.source_prefix + s for s in batch[self.args.source_column]]
            enc = self.tokenizer(sources, max_length=self.max_length, truncation=True)
            targets = self.tokenizer(
                text_target=batch[self.args.target_column], max_length=self.args.max_target_length, truncation=True
            )
            return {
                "input_ids": enc["input_ids"],
                "attention_mask": enc["attention_mask"],
                "labels": targets["input_ids"],
            }

        return self._map(datasets, features)

    def collator(self, model):
        from transformers import DataCollatorForSeq2Seq

        return DataCollatorForSeq2Seq(self.tokenizer, model=model)

    def decode(self, token_ids) -> list[str]:
        token_ids = np.where(token_ids != -100, token_ids, self.tokenizer.pad_token_id)  # -100 pads labels and batches
        return [t.strip() for t in self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)]

    def compute_metrics(self, eval_pred) -> dict[str, float]:
        """BLEU / ROUGE of the generated text, and ``generations_cut``: how many predictions ended without eos (cut
        at ``generation_max_length``; their scores are of cut text), warned about when not 0."""
        predictions = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        cut = cut_generations(predictions, self.tokenizer.eos_token_id)
        if cut:
            logger.warning(
                "seq2seq: %d of %d predictions were cut at generation_max_length %s before eos: raise "
                "generation_max_length (or max_target_length) to score whole predictions",
                cut, len(predictions), self.train_args.generation_max_length,
            )  # fmt: skip
        return {**text_metrics(self.decode(predictions), self.decode(eval_pred.label_ids)), "generations_cut": cut}


def cut_generations(predictions, eos_token_id: int | None) -> int:
    """Rows of generated token ids (padded, -100 or pad after the end) that hold no eos: generation stopped at its
    length limit, not at the end of the text."""
    if eos_token_id is None:
        return 0
    return int(sum(eos_token_id not in np.asarray(row).tolist() for row in predictions))
