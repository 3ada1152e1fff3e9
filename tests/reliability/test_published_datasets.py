"""Published data sets end to end (issue 39, "Must show"), from files in their published layouts
(alignkit.testing.published): a CoNLL train file + test file and a SQuAD train + dev file train a task head with no
eval row trained and the eval metric computed on the held-out file (test_size left in the recipe gives way to it);
hh-rlhf's train.jsonl.gz with an empty final reply trains SFT and then DPO with on_bad_rows: skip, and the skipped
row is listed in alignkit_run.json and the summary. tiny models, a few steps."""

import json

import pytest
from conftest import run_recipe

from alignkit.data.pairing import row_key
from alignkit.testing.published import write_conll, write_hh, write_squad

FAST = ["--load_in_4bit", "false", "--max_steps", "2", "--disable_tqdm", "true", "--per_device_train_batch_size", "4"]


def _record(out):
    return json.loads((out / "alignkit_run.json").read_text())


@pytest.mark.parametrize("task", ["ner", "qa"])
def test_a_held_out_file_is_the_eval_split_and_never_trains(tmp_path, capfd, task, monkeypatch):
    from alignkit.train import runner

    train, held = write_conll(tmp_path) if task == "ner" else write_squad(tmp_path)
    out = tmp_path / task
    seen = {}
    original = runner.Run.load_data

    def spy(self, schema):  # the splits the run trains and evaluates on, as loaded
        seen.update(original(self, schema))
        return self.datasets

    monkeypatch.setattr(runner.Run, "load_data", spy)
    sources = json.dumps([str(train), {"path": str(held), "split": "test"}])
    metrics = run_recipe(
        "task", ["--config", f"recipes/tiny/task_{task}.yaml", "--datasets", sources, "--output_dir", str(out), *FAST]
    )  # fmt: skip  (the recipe's test_size: 0.2 stays)
    assert (len(seen["train"]), len(seen["test"])) == (12, 8)  # every training row trains, every held-out row scores
    trained = {row_key(r) for r in seen["train"]}
    assert not [r for r in seen["test"] if row_key(r) in trained]
    if task == "qa":
        dev = json.loads(held.read_text())["data"][0]["paragraphs"]
        assert sorted(seen["test"]["question"]) == sorted(q["question"] for p in dev for q in p["qas"])  # the dev file
        assert {"eval_exact_match", "eval_f1"} <= set(metrics)
    else:
        assert "eval_f1" in metrics
    data = _record(out)["lineage"][-1]["data"]
    assert data["held_out"] == {"sources": [f"{held} [eval]"], "rows": 8, "also_in_train": 0}
    assert f"eval split: 8 rows from {held} [eval]" in capfd.readouterr().out


def test_hh_jsonl_gz_as_published_trains_sft_then_dpo_skipping_the_empty_reply(tmp_path, capfd):
    data = write_hh(tmp_path / "harmless-base" / "train.jsonl.gz", n=24)
    skip = ["--on_bad_rows", "skip", "--max_bad_rows", "1", "--datasets", str(data), "--disable_tqdm", "true",
            "--max_steps", "2", "--save_strategy", "no"]  # fmt: skip
    sft, dpo = tmp_path / "sft", tmp_path / "dpo"
    run_recipe("sft", ["--config", "recipes/tiny/sft.yaml", "--max_length", "256", "--test_size", "0", *skip,
                       "--output_dir", str(sft)])  # fmt: skip
    summary_sft = capfd.readouterr().out
    run_recipe("dpo", ["--config", "recipes/tiny/dpo.yaml", "--model_name_or_path", str(sft), "--max_length", "256",
                       "--test_size", "4", "--eval_on_start", "true", *skip, "--output_dir", str(dpo)])  # fmt: skip
    summary = capfd.readouterr().out
    # the DPO summary's "before" column is the eval_on_start evaluation (issue 39, item 10); its loss row is named
    rows = {
        line.split()[0]: line.split()
        for line in summary.splitlines()
        if line.startswith("  ") and len(line.split()) >= 3
    }
    assert rows["rewards/accuracies"][1] != "-" and "loss (eval split)" in summary, summary
    logged = json.loads((dpo / "trainer_state.json").read_text())["log_history"]
    step0 = next(e for e in logged if e.get("step") == 0 and "eval_loss" in e)
    assert float(rows["loss"][3]) == pytest.approx(step0["eval_loss"], rel=1e-3)  # "loss (eval split) <before>"
    for out in (sft, dpo):
        listed = _record(out)["lineage"][-1]["data"]
        assert listed["skipped_rows"] == 1
        assert listed["skipped"][0]["file"] == str(data) and listed["skipped"][0]["row"] == 4
        assert "turn 4 (assistant) is empty" in listed["skipped"][0]["problem"]
    for out in (summary_sft, summary):
        assert "skipped rows (on_bad_rows: skip): 1, listed in alignkit_run.json" in out
