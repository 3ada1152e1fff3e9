"""Huge rows (issue 43, case 6): a row far longer than max_length is counted in the truncation report like any other.
A huge reply loses its stop token (counted before too); a huge prompt leaves the row nothing to train, and trl drops
it silently: now it is counted with them, and refused above max_truncated_fraction."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_DATA, run_recipe

from alignkit.errors import DataError


def test_a_huge_prompt_and_a_huge_reply_are_both_counted(tmp_path):
    rows = [json.loads(line) for line in (TINY_DATA / "sft.jsonl").read_text().splitlines()]
    huge = "word " * 200_000  # ~1 MB of text; the 50 MB row behaves the same, slower
    rows += [{"messages": [{"role": "user", "content": "Go on."}, {"role": "assistant", "content": huge}]},
             {"messages": [{"role": "user", "content": huge}, {"role": "assistant", "content": "ok"}]}]  # fmt: skip
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["--config", "recipes/tiny/sft.yaml", "--load_in_4bit", "false", "--datasets", str(data), "--test_size",
            "0", "--max_steps", "1", "--max_length", "128", "--disable_tqdm", "true", "--max_truncated_fraction",
            "0.01", "--output_dir", str(tmp_path / "out")]  # fmt: skip
    with pytest.raises(DataError) as caught:
        run_recipe("sft", argv)
    message = str(caught.value)
    assert f"off 1 of {len(rows)} train rows and leaves nothing to train in 1 more" in message, message
    assert "max_truncated_fraction above 0.03" in message
