"""Each schema error stops the run before any training step, naming the file, the row and the fix."""

import pytest
from conftest import run_recipe, write_jsonl

from alignkit.data import CPT, SFT
from alignkit.errors import DataError

SYSTEM = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "What is 2 + 2?"}
ASSISTANT = {"role": "assistant", "content": "ANSWER: 4"}
GOOD_CHAT = {"messages": [SYSTEM, USER, ASSISTANT]}

# (stage, bad row placed at row 3, what the error must say)
CASES = {
    "missing_column": (
        "sft",
        {"conversation": [USER, ASSISTANT]},
        None,
        r"missing columns for sft data: needs messages or prompt/completion \(or a published format: alpaca .*\), has conversation",
    ),
    "wrong_role_names": (
        "sft",
        {"messages": [{"role": "human", "content": "hi"}, {"role": "gpt", "content": "hello"}]},
        3,
        r"role 'human'.*Fix: .*rename 'human' to 'user'",
    ),
    "empty_text": ("cpt", {"text": "   "}, 3, r"'text' is empty.*Fix: give every row non-empty text"),
    "ends_on_user": (
        "sft",
        {"messages": [USER, ASSISTANT, USER]},
        3,
        r"ends on 'user'.*Fix: end every conversation with an assistant message",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_schema_error_stops_the_run_before_training(case, tmp_path):
    stage, bad_row, row, message = CASES[case]
    good = GOOD_CHAT if stage == "sft" else {"text": "Addition practice. 2 plus 2 makes 4."}
    rows = [good, good, bad_row, good] if row else [bad_row] * 4
    data = write_jsonl(tmp_path / f"{case}.jsonl", rows)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=message) as err:
        run_recipe(
            stage, ["--config", f"recipes/tiny/{stage}.yaml", "--datasets", f"[{data}]", "--output_dir", str(out)]
        )
    assert err.value.source == str(data) and err.value.row == row
    assert str(err.value).startswith(f"{data}, row {row}:" if row else f"{data}:")
    written = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert written == [], f"training must not start: {written} was written"


@pytest.mark.parametrize(
    "messages, problem",
    [
        ([SYSTEM, USER], "ends on 'user'"),
        ([USER, {"role": "assistant", "content": ""}], r"messages\[1\] \(assistant\) has empty content"),
        ([USER, SYSTEM, ASSISTANT], r"messages\[1\] is a system message after the first turn"),
        (
            [{"role": "user"}, ASSISTANT],
            r"messages\[0\] \(user\) has empty content",
        ),  # Arrow fills a missing key with None
        ([], "not a non-empty list of messages"),
    ],
)
def test_sft_row_checks(messages, problem):
    import datasets

    dataset = datasets.Dataset.from_list([GOOD_CHAT, {"messages": messages}])
    with pytest.raises(DataError, match=problem) as err:
        SFT.check(dataset, "chat.jsonl")
    assert err.value.row == 2 and err.value.fix


def test_prompt_completion_and_extra_columns():
    import datasets

    rows = [{"prompt": "2 + 2 =", "completion": " 4", "source": "web"}]
    checked = SFT.check(datasets.Dataset.from_list(rows), "pc.jsonl")
    assert checked.column_names == ["prompt", "completion"]  # the stage's columns only
    with pytest.raises(DataError, match="'completion' is empty"):
        SFT.check(datasets.Dataset.from_list([{"prompt": "2 + 2 =", "completion": ""}]), "pc.jsonl")
    with pytest.raises(DataError, match="has messages"):
        CPT.check(datasets.Dataset.from_list([GOOD_CHAT]), "chat.jsonl")


def test_chat_columns_trl_consumes_are_kept_others_are_reported_and_images_refused(caplog):
    """trl 1.16's SFT and DPO trainers pass ``tools`` and ``chat_template_kwargs`` to the chat template per row:
    the schema keeps them; any other extra column is dropped with a warning naming it; an image column (trl would
    take the rows as vision data) is refused."""
    from datasets import Dataset

    from alignkit.data.schemas import DPO, SFT

    chat = [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]
    rows = Dataset.from_list([{"messages": chat, "tools": "[]", "chat_template_kwargs": {"persona": "terse"}, "id": 7}])
    with caplog.at_level("WARNING", logger="alignkit.data.schemas"):
        kept = SFT.check(rows, "chat.jsonl")
    assert kept.column_names == ["messages", "tools", "chat_template_kwargs"]
    assert "chat.jsonl: columns ['id'] are not used by the sft stage and are dropped" in caplog.text
    pair = Dataset.from_list([{"prompt": "2 + 2?", "chosen": "4", "rejected": "5", "chat_template_kwargs": {"x": 1}}])
    assert DPO.check(pair, "pairs.jsonl").column_names == ["prompt", "chosen", "rejected", "chat_template_kwargs"]
    with pytest.raises(DataError, match=r"chat.jsonl: has an image column \(images\).*Fix: drop the images column"):
        SFT.check(Dataset.from_list([{"messages": chat, "images": ["a.png"]}]), "chat.jsonl")
