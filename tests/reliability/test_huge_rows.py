"""Huge rows (issue 43, case 6): a row far longer than max_length is counted in the truncation report like any other,
and `alignkit data preview` names it by file and line. A huge reply loses its stop token (counted before too); a
huge prompt leaves the row nothing to train, and trl drops it silently: now it is counted with them, and refused
above max_truncated_fraction."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_DATA, run_recipe

from alignkit.errors import DataError

HUGE = "word " * 200_000  # ~1 MB of text; the 50 MB row behaves the same, slower


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The tiny SFT rows (lines 1-64), then a huge reply (line 65) and a huge prompt (line 66)."""
    rows = [json.loads(line) for line in (TINY_DATA / "sft.jsonl").read_text().splitlines()]
    rows += [{"messages": [{"role": "user", "content": "Go on."}, {"role": "assistant", "content": HUGE}]},
             {"messages": [{"role": "user", "content": HUGE}, {"role": "assistant", "content": "ok"}]}]  # fmt: skip
    path = tmp_path_factory.mktemp("huge") / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, len(rows)


def test_a_huge_prompt_and_a_huge_reply_are_both_counted(data, tmp_path):
    path, n = data
    argv = ["--config", "recipes/tiny/sft.yaml", "--load_in_4bit", "false", "--datasets", str(path), "--test_size",
            "0", "--max_steps", "1", "--max_length", "128", "--disable_tqdm", "true", "--max_truncated_fraction",
            "0.01", "--output_dir", str(tmp_path / "out")]  # fmt: skip
    with pytest.raises(DataError) as caught:
        run_recipe("sft", argv)
    message = str(caught.value)
    assert f"off 1 of {n} train rows and leaves nothing to train in 1 more" in message, message
    assert "max_truncated_fraction above 0.03" in message


def test_data_preview_names_the_huge_rows_by_line(data, capsys):
    from alignkit.cli import data as data_command

    path, _ = data
    data_command(["preview", "sft", "--config", "recipes/tiny/sft.yaml", "--load_in_4bit", "false", "--datasets",
                  str(path), "--test_size", "0", "--max_length", "128", "--output_dir", "unused"])  # fmt: skip
    lines = [line for line in capsys.readouterr().out.splitlines() if "longer than max_length" in line]
    assert len(lines) == 1, lines
    assert lines[0].startswith("   2 row(s) longer than max_length 128 tokens"), lines[0]
    assert f"{path} line 66 (" in lines[0] and f"{path} line 65 (" in lines[0], lines[0]  # by file and line
    named = lines[0].split(": ", 1)[1].split("), ")
    tokens = [int(part.split("(~")[1].split(" tokens")[0].replace(",", "")) for part in named]
    assert all(500_000 < t < 700_000 for t in tokens), tokens  # the whole row estimated (600,000 words and spaces)
