"""Published dataset formats (issue 19): each converter turns hand-written rows into the stage's canonical columns
exactly (asserted row by row), detection picks the right one and reports ambiguity, conversion errors name file,
row, format and fix, and each format trains 2 steps through its recipe on the tiny model."""

from __future__ import annotations

import json
import logging

import pytest
from conftest import run_recipe

from alignkit.config.args import DATA_FORMATS, DatasetSource
from alignkit.data.formats import FORMATS, convert_source
from alignkit.errors import ConfigError, DataError

U, A, S = "user", "assistant", "system"


def _m(role, content):
    return {"role": role, "content": content}


ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hi.", "input": "", "output": "Hi!", "system": "Be brief."},
    {"instruction": "And 4 + 4?", "output": "8", "history": [["What is 1 + 1?", "2"]]},
]
ALPACA_AS_MESSAGES = [
    [_m(U, "Add the numbers.\n\n2 and 3"), _m(A, "5")],
    [_m(S, "Be brief."), _m(U, "Say hi."), _m(A, "Hi!")],
    [_m(U, "What is 1 + 1?"), _m(A, "2"), _m(U, "And 4 + 4?"), _m(A, "8")],
]
SHAREGPT = [
    {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hello"},
                       {"from": "gpt", "value": "Hi there"}]},
    {"conversations": [{"from": "human", "value": "2 + 2?"}, {"from": "gpt", "value": "4"},
                       {"from": "human", "value": "3 + 3?"}, {"from": "gpt", "value": "6"}]},
]  # fmt: skip
SHAREGPT_AS_MESSAGES = [
    [_m(S, "Be kind."), _m(U, "Hello"), _m(A, "Hi there")],
    [_m(U, "2 + 2?"), _m(A, "4"), _m(U, "3 + 3?"), _m(A, "6")],
]
HH = [
    {"chosen": "\n\nHuman: What is 2 + 2?\n\nAssistant: It is 4.",
     "rejected": "\n\nHuman: What is 2 + 2?\n\nAssistant: It is 5."},
    {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Capital of France?\n\nAssistant: Paris.",
     "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Capital of France?\n\nAssistant: Lyon, I think."},
]  # fmt: skip
HH_AS_PREFERENCE = [
    {"prompt": [_m(U, "What is 2 + 2?")], "chosen": [_m(A, "It is 4.")], "rejected": [_m(A, "It is 5.")]},
    {"prompt": [_m(U, "Hi"), _m(A, "Hello!"), _m(U, "Capital of France?")], "chosen": [_m(A, "Paris.")],
     "rejected": [_m(A, "Lyon, I think.")]},
]  # fmt: skip
PREFERENCE_MESSAGES = [
    {"chosen": [_m(U, "Best color?"), _m(A, "Blue, calm and clear.")],
     "rejected": [_m(U, "Best color?"), _m(A, "Dunno.")]},
]  # fmt: skip
PREFERENCE_MESSAGES_AS_PREFERENCE = [
    {"prompt": [_m(U, "Best color?")], "chosen": [_m(A, "Blue, calm and clear.")], "rejected": [_m(A, "Dunno.")]}
]


def _convert(rows, stage, **source):
    """Through the JSON reader, as a recipe reads a file (rows may differ in their keys)."""
    import tempfile
    from pathlib import Path

    from datasets import load_dataset

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        dataset = load_dataset("json", data_files=str(path), split="train", cache_dir=tmp)
        return list(convert_source(dataset, DatasetSource(path="x.jsonl", **source), stage, "x.jsonl"))


@pytest.mark.parametrize(
    "rows, stage, expected, name",
    [
        (ALPACA, "sft", [{"messages": m} for m in ALPACA_AS_MESSAGES], "alpaca"),
        (SHAREGPT, "sft", [{"messages": m} for m in SHAREGPT_AS_MESSAGES], "sharegpt"),
        (HH, "dpo", HH_AS_PREFERENCE, "hh"),
        (HH[:1], "sft", [{"messages": [_m(U, "What is 2 + 2?"), _m(A, "It is 4.")]}], "hh"),
        (PREFERENCE_MESSAGES, "dpo", PREFERENCE_MESSAGES_AS_PREFERENCE, "preference_messages"),
        ([{"messages": ALPACA_AS_MESSAGES[0]}], "sft", [{"messages": ALPACA_AS_MESSAGES[0]}], "messages"),
        ([{"prompt": "1 + 1 =", "completion": " 2"}], "sft", [{"prompt": "1 + 1 =", "completion": " 2"}],
         "prompt_completion"),
        ([{"prompt": "Hi?", "chosen": "Hey.", "rejected": "No."}], "dpo",
         [{"prompt": "Hi?", "chosen": "Hey.", "rejected": "No."}], "preference"),
        ([{"text": "raw text"}], "cpt", [{"text": "raw text"}], "text"),
    ],
    ids=["alpaca", "sharegpt", "hh-dpo", "hh-sft", "preference-messages", "messages", "prompt-completion",
         "preference", "text"],
)  # fmt: skip
def test_each_format_converts_row_by_row_and_is_detected(rows, stage, expected, name, caplog):
    with caplog.at_level(logging.INFO, logger="alignkit.data.formats"):
        detected = _convert(rows, stage)
    assert detected == expected
    assert f"x.jsonl: format {name} (detected" in caplog.text
    assert _convert(rows, stage, format=name) == expected  # named explicitly: the same


def test_ambiguous_sources_are_reported_not_guessed():
    rows = [{"messages": ALPACA_AS_MESSAGES[0], "conversations": SHAREGPT[0]["conversations"]}]
    with pytest.raises(DataError, match=r"x.jsonl: matches the formats \['messages', 'sharegpt'\].*Fix: set format:"):
        _convert(rows, "sft")


def test_hh_rows_without_a_shared_prompt_are_reported_with_their_row():
    bad = {"chosen": "\n\nHuman: A?\n\nAssistant: Yes.", "rejected": "\n\nHuman: B?\n\nAssistant: No."}
    with pytest.raises(DataError, match=r"x.jsonl, row 3: hh: the two transcripts share no opening user turn.*Fix"):
        _convert([*HH, bad], "dpo")


def test_sharegpt_roles_map_and_the_error_that_asks_for_it():
    rows = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Hello"}]}]
    with pytest.raises(
        DataError, match=r"row 1: sharegpt: turn 2 has from='bot'.*Fix: map it with roles: \{bot: assistant\}"
    ):
        _convert(rows, "sft")
    assert _convert(rows, "sft", roles={"bot": "assistant"}) == [{"messages": [_m(U, "Hi"), _m(A, "Hello")]}]
    with pytest.raises(ConfigError, match="roles"):
        DatasetSource(path="x", roles={"bot": "robot"})


def test_columns_map_renames_to_the_formats_columns_and_unknown_names_are_errors():
    rows = [{"question": "Say hi.", "answer": "Hi!"}]
    converted = _convert(rows, "sft", columns={"instruction": "question", "output": "answer"})
    assert converted == [{"messages": [_m(U, "Say hi."), _m(A, "Hi!")]}]
    with pytest.raises(
        DataError, match=r"columns: 'instrction' is not a column of any format. Did you mean 'instruction'"
    ):
        _convert(rows, "sft", columns={"instrction": "question"})
    with pytest.raises(DataError, match=r"columns: maps to \['questions'\]"):
        _convert(rows, "sft", columns={"instruction": "questions", "output": "answer"})
    with pytest.raises(ConfigError, match=r"format: 'alpacca'.*Did you mean 'alpaca'"):
        DatasetSource(path="x", format="alpacca")


def test_the_config_list_of_formats_is_the_registry():
    assert set(DATA_FORMATS) == set(FORMATS)


@pytest.mark.parametrize(
    "stage, rows",
    [("sft", ALPACA * 4), ("sft", SHAREGPT * 4), ("sft", HH * 4), ("dpo", HH * 4), ("dpo", PREFERENCE_MESSAGES * 6)],
    ids=["sft-alpaca", "sft-sharegpt", "sft-hh", "dpo-hh", "dpo-preference-messages"],
)
def test_each_format_trains_two_steps(stage, rows, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = ["--model_name_or_path", "tiny:llama"] if stage == "dpo" else []
    argv = ["--config", f"recipes/tiny/{stage}.yaml", *base, "--datasets", str(data), "--test_size", "0",
            "--max_steps", "2", "--save_steps", "100", "--output_dir", str(tmp_path / "out"), "--disable_tqdm", "true"]  # fmt: skip
    run_recipe(stage, argv)
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == 2


def test_data_preview_shows_the_format_the_rows_and_the_trained_tokens(tmp_path, capsys):
    from alignkit.cli import main as cli

    data = tmp_path / "alpaca.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ALPACA))
    argv = ["data", "preview", "sft", "--config", "recipes/tiny/sft.yaml", "--datasets", str(data), "--test_size", "0",
            "--output_dir", str(tmp_path / "out")]  # fmt: skip
    assert cli(argv) == 0
    out = capsys.readouterr().out
    assert f"== {data} [train]: format alpaca (detected); 3 rows pass the sft checks" in out
    assert '"content": "Add the numbers.\\n\\n2 and 3"' in out and "label preview:" in out and "[" in out
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "x"}]}) + "\n"
    )
    assert cli(["data", "preview", "sft", "--config", "recipes/tiny/sft.yaml", "--datasets", str(bad)]) == 2
    captured = capsys.readouterr()
    assert "from='bot'" in captured.out and "refused:" in captured.out and '"from": "bot"' in captured.out


def test_dataset_num_proc_2_converts_and_packs_the_same_rows_as_one_process(tiny_llama, tmp_path):
    """``dataset_num_proc`` reaches the format conversion and CPT's packing; SFT/DPO recipes give trl the same key.
    A bad row found in a worker process still names its file and line."""
    from conftest import write_jsonl
    from datasets import Dataset
    from transformers import AutoTokenizer

    from alignkit.config.args import DataArguments
    from alignkit.data import SFT, load_datasets
    from alignkit.data.packing import pack_text_blocks
    from alignkit.stages import STAGES

    path = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA * 4)
    one, two = (list(load_datasets(DataArguments(datasets=[str(path)], dataset_num_proc=n), SFT)["train"]) for n in (1, 2))  # fmt: skip
    assert one == two == [{"messages": m} for m in ALPACA_AS_MESSAGES * 4]
    write_jsonl(path, [*ALPACA * 3, {"instruction": "No output.", "output": ""}, *ALPACA])
    with pytest.raises(DataError, match=r"alpaca\.jsonl, row 10: alpaca: 'output' is empty") as err:
        load_datasets(DataArguments(datasets=[str(path)], dataset_num_proc=2), SFT)
    assert (err.value.source, err.value.row) == (str(path), 10)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama))
    text = Dataset.from_list([{"text": f"row {i} says {i} plus {i} makes {2 * i}."} for i in range(40)])
    assert pack_text_blocks(text, tokenizer, 16, num_proc=2)[:] == pack_text_blocks(text, tokenizer, 16)[:]
    sft = STAGES["sft"].parse(["--config", "recipes/tiny/sft.yaml", "--dataset_num_proc", "2"])
    assert sft.data.dataset_num_proc == sft.train.dataset_num_proc == 2  # one key: alignkit's conversion and trl's
    assert (
        STAGES["cpt"].parse(["--config", "recipes/tiny/cpt.yaml", "--dataset_num_proc", "2"]).data.dataset_num_proc == 2
    )
