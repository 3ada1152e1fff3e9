"""Lengths that fit (issue 39, case 4): a max_length the truncation limit refuses names the smallest max_length that
keeps it, from the rows' measured lengths (p95/p99/max), and that length then passes; an eval split is never refused
(nothing trains on it) and its warning says so; DPO's and KTO's counts include the rows trl drops before its
collator cuts, named by file and row."""

from __future__ import annotations

import json
import logging
import re

import pytest
from conftest import TINY_DATA, run_recipe

from alignkit.errors import DataError
from alignkit.train.checks import fitting_length

TINY = ["--config", "recipes/tiny/sft.yaml", "--max_steps", "1", "--save_strategy", "no", "--disable_tqdm", "true"]
ROWS = [json.loads(line) for line in (TINY_DATA / "sft.jsonl").read_text().splitlines()]


def test_fitting_length_by_hand():
    lengths = list(range(1, 101))  # 1..100 tokens
    fit = fitting_length(lengths, 0.05)
    assert fit == {"fits": 96, "cut": 0.04, "p95": 95, "p99": 99, "max": 100}  # 95, rounded up to 8: cuts 4 of 100
    assert fitting_length(lengths, 0.0)["fits"] == 104 and fitting_length([7], 0.5)["fits"] == 8


def test_a_refused_max_length_names_one_that_fits_and_it_does(tmp_path):
    with pytest.raises(DataError) as caught:
        run_recipe("sft", [*TINY, "--max_length", "80", "--output_dir", str(tmp_path / "a")])
    message = str(caught.value)
    assert "off 56 of 56 train rows" in message
    fits = int(re.search(r"set max_length: (\d+) \(cuts (\d+\.\d)% of these rows; their lengths in tokens: p95 "
                         r"(\d+), p99 (\d+), max (\d+)\)", message).group(1))  # fmt: skip
    assert 80 < fits
    run_recipe("sft", [*TINY, "--max_length", str(fits), "--output_dir", str(tmp_path / "b")])  # passes the check


def test_an_eval_split_is_scored_cut_never_refused(tmp_path, caplog):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:40]))
    long = [{"messages": [{"role": "user", "content": r["messages"][0]["content"] + " Explain it step by step."},
                          {"role": "assistant", "content": r["messages"][-1]["content"] + " " + "and so on " * 12}]}
            for r in ROWS[40:48]]  # fmt: skip
    held = tmp_path / "eval.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in long))
    datasets = json.dumps([str(data), {"path": str(held), "role": "eval"}])
    with caplog.at_level(logging.WARNING, logger="alignkit.train.checks"):
        run_recipe("sft", [*TINY, "--datasets", datasets, "--max_length", "128", "--output_dir", str(tmp_path / "o")])
    assert re.search(r"cuts the stop token .* off 8 of the 8 test rows .*scored without their ends \(nothing "
                     r"trains on them\)", caplog.text), caplog.text  # fmt: skip
    assert "learns not to stop" not in caplog.text


def test_dpo_counts_the_pairs_trl_drops_with_the_cut_ones(tmp_path):
    rows = [json.loads(line) for line in (TINY_DATA / "dpo.jsonl").read_text().splitlines()]
    prompt = rows[0]["prompt"]
    long = [*prompt[:-1], {**prompt[-1], "content": prompt[-1]["content"] + " word" * 200}]
    rows[0] = {**rows[0], "prompt": long}  # its prompt alone fills max_length: trl drops the pair
    data = tmp_path / "dpo.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["--config", "recipes/tiny/dpo.yaml", "--model_name_or_path", "tiny:llama", "--max_steps", "1",
            "--datasets", str(data), "--test_size", "0", "--max_length", "90", "--output_dir", str(tmp_path / "o")]  # fmt: skip
    with pytest.raises(DataError, match=rf"off \d+ of {len(rows)} train rows and leaves nothing to train in 1 more"):
        run_recipe("dpo", argv)


def test_kto_counts_and_names_the_rows_trl_drops(tmp_path, capsys):
    """trl 1.16's KTOTrainer drops a row whose prompt alone fills max_length (its collator would cut the whole
    completion): the truncation count includes it, names its file and row, a run that allows it records it, and
    `alignkit data preview kto` names it."""
    pairs = [json.loads(line) for line in (TINY_DATA / "dpo.jsonl").read_text().splitlines()][:16]
    rows = [{"prompt": p["prompt"], "completion": p["chosen" if i % 2 else "rejected"], "label": bool(i % 2)}
            for i, p in enumerate(pairs)]  # fmt: skip
    prompt = rows[2]["prompt"]
    rows[2]["prompt"] = [*prompt[:-1], {**prompt[-1], "content": prompt[-1]["content"] + " word" * 200}]
    data = tmp_path / "kto.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["--config", "recipes/tiny/kto.yaml", "--model_name_or_path", "tiny:llama", "--load_in_4bit", "false",
            "--max_steps", "1", "--datasets", str(data), "--test_size", "0", "--max_length", "90",
            "--save_strategy", "no", "--disable_tqdm", "true"]  # fmt: skip
    pattern = (
        rf"off (\d+) of 16 train rows and leaves nothing to train in 1 more \(dropped: a prompt or row longer "
        rf"than max_length; prompts of max_length tokens or more in the data: {re.escape(str(data))} row 3\)"
    )
    with pytest.raises(DataError, match=pattern):
        run_recipe("kto", [*argv, "--output_dir", str(tmp_path / "a")])
    run_recipe("kto", [*argv, "--max_truncated_fraction", "1", "--output_dir", str(tmp_path / "b")])
    report = json.loads((tmp_path / "b" / "alignkit_run.json").read_text())["lineage"][-1]["data"]
    assert report["prompt_fills_max_length"] == [{"file": str(data), "row": 3}]
    from alignkit.cli import main as cli  # the preview says so before any run

    capsys.readouterr()
    assert cli(["data", "preview", "kto", *argv, "--output_dir", str(tmp_path / "c")]) == 0
    assert f"1 row(s) whose prompt alone fills max_length 90 (trl drops them; the truncation count includes them): " \
           f"{data} row 3" in capsys.readouterr().out  # fmt: skip
