"""Task heads as users use them: published files (a CoNLL column file, a SQuAD v2 JSON) train through recipes/task.py,
the run ends on a console summary naming its metric, and ``alignkit merge`` gives a standalone model that
transformers loads with its plain auto class / ``pipeline(...)`` (no "newly initialized" warning) and that predicts
what the adapter model alignkit trained predicts in memory. tiny:bert, LoRA on full-precision weights, 2 steps."""

import json

import numpy as np
import pytest
import torch
from conftest import run_recipe

from alignkit.errors import DataError
from alignkit.runs import RunRecord

# CoNLL-2003 as published: word POS chunk NER, IOB1 tags (I- opens an entity), -DOCSTART- between documents
CONLL = """-DOCSTART- -X- -X- O

Alice NNP B-NP I-PER
Smith NNP I-NP I-PER
lives VBZ B-VP O
in IN B-PP O
Paris NNP B-NP I-LOC
. . O O

Bob NNP B-NP I-PER
works VBZ B-VP O
for IN B-PP O
Acme NNP B-NP I-ORG
Corp NNP I-NP I-ORG
. . O O

-DOCSTART- -X- -X- O

Carol NNP B-NP I-PER
visited VBD B-VP O
London NNP B-NP I-LOC
and CC O O
Berlin NNP B-NP B-LOC
. . O O

The DT B-NP O
Red NNP I-NP I-ORG
Cross NNP I-NP I-ORG
helped VBD B-VP O
Dan NNP B-NP I-PER
. . O O

Eve NNP B-NP I-PER
moved VBD B-VP O
to TO B-PP O
Rome NNP B-NP I-LOC
. . O O

Frank NNP B-NP I-PER
joined VBD B-VP O
Globex NNP B-NP I-ORG
in IN B-PP O
Oslo NNP B-NP I-LOC
. . O O
"""
LORA_FP32 = ["--load_in_4bit", "false", "--max_steps", "2", "--disable_tqdm", "true", "--learning_rate", "1e-2"]


def _no_new_head_warning(capfd, load):
    capfd.readouterr()
    value = load()
    out, err = capfd.readouterr()
    assert "newly initialized" not in out + err and "MISSING" not in out + err, out + err
    return value


def test_conll_file_trains_and_the_merged_ner_model_runs_in_a_pipeline(tmp_path, capfd):
    from transformers import AutoModelForTokenClassification, pipeline

    from alignkit.export.merge import merge_adapter
    from alignkit.models import load_trained

    data = tmp_path / "train.conll"
    data.write_text(CONLL)
    out = tmp_path / "ner"
    argv = ["--config", "recipes/tiny/task_ner.yaml", "--datasets", str(data), "--test_size", "2"]
    metrics = run_recipe("task", [*argv, "--output_dir", str(out), "--per_device_train_batch_size", "4", *LORA_FP32])
    assert "eval_f1" in metrics
    summary = capfd.readouterr().out
    assert "== alignkit task token_cls: finished" in summary
    f1_row = next(line for line in summary.splitlines() if line.split()[:1] == ["f1"])
    assert float(f1_row.split()[-1]) == pytest.approx(metrics["eval_f1"], abs=5e-4)
    assert f"alignkit merge {out}" in summary and "aggregation_strategy='first')" in summary  # the record's (issue 39)
    assert RunRecord.read(out).last.inference == {"aggregation_strategy": "first"}
    assert any(line.split()[:3] == ["loss", "(eval", "split)"] for line in summary.splitlines()), summary

    result = merge_adapter(out)
    assert result.parity.passed, result.parity.summary()
    merge_line = capfd.readouterr().out  # a task head's parity: its logits, no loss of 0 on unlabelled prompts
    assert "max |token_cls head logit diff|" in merge_line and "loss on the parity prompts" not in merge_line
    assert RunRecord.read(result.output_dir).merge.loss_delta is None
    merged = str(result.output_dir)
    _no_new_head_warning(capfd, lambda: AutoModelForTokenClassification.from_pretrained(merged))
    ner = _no_new_head_warning(capfd, lambda: pipeline("token-classification", model=merged))

    model, tokenizer = load_trained(out)  # the adapter + trained head, as alignkit trained it, in memory
    text = "Alice Smith works for Acme Corp in Paris ."
    enc = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        probs = model(**enc).logits[0].softmax(-1)
    names = model.config.id2label
    special = set(tokenizer.all_special_ids)
    expected = [
        (i, names[int(p.argmax())], float(p.max()))
        for i, (token, p) in enumerate(zip(enc["input_ids"][0].tolist(), probs))
        if token not in special and names[int(p.argmax())] != "O"
    ]
    got = [(e["index"], e["entity"], e["score"]) for e in ner(text)]
    assert [g[:2] for g in got] == [e[:2] for e in expected]
    assert np.allclose([g[2] for g in got], [e[2] for e in expected], atol=1e-5)

    # a run that fails before training (bad data) into an earlier run's folder removes nothing of it
    before = sorted(p.name for p in out.iterdir())
    bad = tmp_path / "bad.conll"
    bad.write_text("Alice NNP B-NP I-PER\nSmith NNP I-PER\n")
    with pytest.raises(DataError, match=r"bad\.conll, row 2: has 3 columns, but line 1 has 4"):
        run_recipe("task", [*argv[:2], "--datasets", str(bad), "--output_dir", str(out), "--overwrite_output_dir",
                            "true", *LORA_FP32])  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == before
    assert json.loads((out / "alignkit_run.json").read_text())["status"] == "finished"
    fresh = tmp_path / "never"
    with pytest.raises(DataError):
        run_recipe("task", [*argv[:2], "--datasets", str(bad), "--output_dir", str(fresh), *LORA_FP32])
    assert not fresh.exists(), "a run that failed before writing anything leaves no folder behind"


def _squad_v2() -> dict:
    paragraphs = []
    facts = [
        ("Alice", "Paris", "Alice lives in Paris and works at a bakery near the river."),
        ("Bob", "Berlin", "Bob moved to Berlin last year to study music at the academy."),
        ("Carol", "Rome", "Carol was born in Rome, but she grew up on a farm far away."),
        ("Dan", "Oslo", "Dan teaches history in Oslo at a small school by the harbour."),
        ("Eve", "Lima", "Eve opened a cafe in Lima that serves coffee from the hills."),
    ]
    for k, (name, city, context) in enumerate(facts):
        qas = [{"id": f"q{k}", "question": f"Where does {name} live?",
                "answers": [{"text": city, "answer_start": context.index(city)}]},
               {"id": f"u{k}", "question": "What is the name of the dog?", "answers": [], "is_impossible": True,
                "plausible_answers": [{"text": name, "answer_start": 0}]}]  # fmt: skip
        paragraphs.append({"context": context, "qas": qas})
    return {"version": "v2.0", "data": [{"title": "people", "paragraphs": paragraphs}]}


def test_squad_v2_json_trains_and_the_merged_qa_model_answers_as_in_memory(tmp_path, capfd):
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    from alignkit.export.merge import merge_adapter
    from alignkit.models import load_trained
    from alignkit.tasks.qa import predict

    data = tmp_path / "squad.json"
    data.write_text(json.dumps(_squad_v2(), indent=1))
    out = tmp_path / "qa"
    argv = ["--config", "recipes/tiny/task_qa.yaml", "--datasets", str(data), "--test_size", "4"]
    argv += ["--output_dir", str(out), "--per_device_train_batch_size", "4", *LORA_FP32]
    with pytest.raises(DataError, match="set version_2_with_negative: true"):
        run_recipe("task", argv)  # an unanswerable question needs the null answer turned on
    metrics = run_recipe("task", [*argv, "--version_2_with_negative", "true"])
    assert {"eval_exact_match", "eval_f1"} <= set(metrics)

    merged = str(merge_adapter(out).output_dir)
    model = _no_new_head_warning(capfd, lambda: AutoModelForQuestionAnswering.from_pretrained(merged))
    tokenizer = AutoTokenizer.from_pretrained(merged)
    in_memory, in_memory_tokenizer = load_trained(out)
    context = "Frank lives in Madrid and repairs bicycles in a shop near the old station."
    for question in ("Where does Frank live?", "What does Frank repair?"):
        for threshold in (None, 0.0):
            got = predict(model, tokenizer, question, context, 64, 16, null_score_diff_threshold=threshold)
            want = predict(
                in_memory, in_memory_tokenizer, question, context, 64, 16, null_score_diff_threshold=threshold
            )
            assert (got["answer"], got["start"], got["end"]) == (want["answer"], want["start"], want["end"])
            assert got["score"] == pytest.approx(want["score"], abs=1e-4)
            assert got["answer"] == context[got["start"] : got["end"]]
    # predict() reads the run's own windows from the run record (the merged folder's keeps the run's lineage)
    assert RunRecord.read(merged).lineage[-2].inference == {
        "max_length": 64, "doc_stride": 16, "n_best_size": 20, "max_answer_length": 30, "null_score_diff_threshold": 0.0
    }  # fmt: skip
    for m, t in ((model, tokenizer), (in_memory, in_memory_tokenizer)):
        assert predict(m, t, "Where does Frank live?", context) == predict(
            m, t, "Where does Frank live?", context, 64, 16, 20, 30, 0.0
        )
    long = " ".join(f"Person {k} lives in Town {k}." for k in range(40)) + " Frank lives in Madrid."
    assert predict(model, tokenizer, "Where does Frank live?", long) != predict(
        model, tokenizer, "Where does Frank live?", long, 128, 32
    )  # other windows, another answer or score: the settings are applied, not ignored


def test_merged_classifier_runs_in_a_pipeline_and_the_final_eval_is_not_repeated(tmp_path, capfd):
    from transformers import pipeline

    from alignkit.export.merge import merge_adapter
    from alignkit.models import load_trained

    out = tmp_path / "cls"
    argv = ["--config", "recipes/tiny/task_cls.yaml", "--output_dir", str(out), *LORA_FP32]
    metrics = run_recipe("task", [*argv, "--eval_strategy", "steps", "--eval_steps", "2"])
    assert "eval_accuracy" in metrics
    evals = [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "eval_loss" in e]
    assert len(evals) == 1, f"the model at step 2 was evaluated {len(evals)} times: {evals}"
    assert metrics["eval_loss"] == evals[0]["eval_loss"]

    merged = str(merge_adapter(out).output_dir)
    classify = _no_new_head_warning(capfd, lambda: pipeline("text-classification", model=merged, top_k=None))
    model, tokenizer = load_trained(out)
    texts = ["the chef cooked a spicy curry", "our laptop updated the software"]
    with torch.no_grad():
        probs = model(**tokenizer(texts, return_tensors="pt", padding=True)).logits.softmax(-1)
    for text, p, scores in zip(texts, probs, classify(texts)):
        got = {s["label"]: s["score"] for s in scores}
        want = {model.config.id2label[i]: float(v) for i, v in enumerate(p)}
        assert got.keys() == want.keys()
        assert np.allclose([got[k] for k in want], list(want.values()), atol=1e-5), (text, got, want)


def test_ner_rows_cut_by_max_length_are_refused_above_the_fraction_and_reported_below(tmp_path, caplog):
    """A max_length that cuts the tail words of most rows is refused before the model loads, naming the split, the
    counts and the max_length that keeps every row whole; allowed by max_truncated_fraction, it is reported."""
    import logging
    import re

    from alignkit.recipes.task import main

    from alignkit.errors import DataError

    base = ["--config", "recipes/tiny/task_ner.yaml", "--max_length", "8", "--max_steps", "1"]
    with pytest.raises(DataError, match=r"train split: max_length 8 cuts \d+ of \d+ train rows .*Fix: max_length: \d+"):
        main([*base, "--output_dir", str(tmp_path / "refused")])
    assert not (tmp_path / "refused").exists()
    with caplog.at_level(logging.WARNING, logger="alignkit"):
        main([*base, "--max_truncated_fraction", "1.0", "--output_dir", str(tmp_path / "allowed")])
    found = re.search(r"max_length 8 cuts (\d+) of (\d+) train rows \((\d+) words", caplog.text)
    assert found and 0 < int(found[1]) <= int(found[2]) and int(found[3]) >= int(found[1])
