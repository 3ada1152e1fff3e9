"""Bad task data fails with file, row and fix before any model loads or trains."""

import pytest
from conftest import run_recipe, write_jsonl

from alignkit.errors import ConfigError, DataError
from alignkit.testing.synthetic import ner_rows, qa_rows


def _run(tmp_path, recipe, rows, *extra):
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "out"
    argv = ["--config", f"recipes/tiny/{recipe}.yaml", "--datasets", f"[{data}]", "--output_dir", str(out), *extra]
    with pytest.raises((DataError, ConfigError)) as info:
        run_recipe("task", argv)
    assert not (out / "alignkit_run.json").exists(), "the error must come before training starts"
    return info.value, str(data)


def test_tag_outside_the_label_list(tmp_path):
    rows = ner_rows(6)
    rows[3] = {"tokens": ["Alice", "visited", "Paris"], "ner_tags": ["B-PER", "O", "B-CITY"]}
    error, path = _run(tmp_path, "task_ner", rows)
    assert isinstance(error, DataError) and (error.source, error.row) == (path, 4)
    assert "B-CITY" in error.problem and "label_list" in error.fix


def test_a_conll_files_bad_tag_names_its_own_line(tmp_path):
    """issue 39 (10): the line of the word with the bad tag, not the line its sentence starts on."""
    data = tmp_path / "train.conll"
    lines = ["-DOCSTART- -X- -X- O", "", "Alice NNP B-NP I-PER", "lives VBZ B-VP O", ". . O O", ""]
    lines += ["Bob NNP B-NP I-PER", "works VBZ B-VP O", "in IN B-PP O", "Rome NNP B-NP I-CITY", ". . O O", ""]
    data.write_text("\n".join(lines * 3))
    out = tmp_path / "out"
    with pytest.raises(DataError) as info:
        run_recipe(
            "task", ["--config", "recipes/tiny/task_ner.yaml", "--datasets", str(data), "--output_dir", str(out)]
        )
    assert (info.value.source, info.value.row) == (str(data), 10)  # the sentence starts on line 7
    assert "word 4 'Rome'" in info.value.problem and "B-CITY" in info.value.problem  # IOB1 I-CITY read as B-CITY


def test_empty_token_and_tag_count(tmp_path):
    rows = ner_rows(4)
    rows[1] = {"tokens": ["Alice", " ", "Paris"], "ner_tags": ["B-PER", "O", "B-LOC"]}
    error, _ = _run(tmp_path, "task_ner", rows)
    assert error.row == 2 and "empty token" in error.problem
    rows[1] = {"tokens": [], "ner_tags": []}
    error, _ = _run(tmp_path, "task_ner", rows)
    assert error.row == 2 and "empty" in error.problem
    rows[1] = {"tokens": ["Alice", "ran"], "ner_tags": ["B-PER"]}
    error, _ = _run(tmp_path, "task_ner", rows)
    assert error.row == 2 and "2 words but 1 tags" in error.problem


def test_answer_start_that_does_not_match_the_answer_text(tmp_path):
    rows = qa_rows(5)
    good_start = rows[2]["answers"]["answer_start"][0]
    rows[2]["answers"]["answer_start"] = [good_start + 3]
    error, path = _run(tmp_path, "task_qa", rows)
    assert (error.source, error.row) == (path, 3)
    assert (
        "answer_start" in error.problem
        and f"set answer_start to {rows[2]['context'].find(rows[2]['answers']['text'][0])}" in error.fix
    )


def test_label_not_in_label_list_for_classification(tmp_path):
    rows = [{"text": "the team won the match", "label": "sports"}, {"text": "the chef baked bread", "label": "cooking"}]
    error, _ = _run(tmp_path, "task_cls", rows)
    assert error.row == 2 and "cooking" in error.problem


def test_missing_label_list_and_wrong_task_are_config_errors(tmp_path):
    error, _ = _run(tmp_path, "task_ner", ner_rows(4), "--label_list", "null")
    assert isinstance(error, ConfigError) and "label_list" in str(error)
    error, _ = _run(tmp_path, "task_ner", ner_rows(4), "--task", "causal_lm")
    assert isinstance(error, ConfigError) and "recipes/sft.py" in str(error)


def test_answer_start_fix_names_the_nearest_occurrence():
    """A context can hold the answer text several times: the fix points at the occurrence nearest the given offset,
    not the first (which would label another span)."""
    from alignkit.tasks.qa import QuestionAnswering
    from alignkit.tasks.qa import QuestionAnsweringArguments as Args

    context = "Alice works in London. Later, Dave moved to London too."
    row = {
        "question": "Where did Dave move?",
        "context": context,
        "answers": {"text": ["London"], "answer_start": [47]},
    }
    task = QuestionAnswering.__new__(QuestionAnswering)
    task.args = Args()
    with pytest.raises(DataError, match=r"set answer_start to 44, where the text occurs nearest to 47 \(2 places"):
        task.schema.check_row(row, "qa.jsonl", 4)
