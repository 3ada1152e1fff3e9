"""A family whose generation prompt ends with text its rendering of a reply does not start with (DeepSeek-R1-distill:
'<｜Assistant｜><think>\\n') asks the trained model after it in chat/generate/eval/serve; rows whose replies do not
start with it are said, with the count and the fix (defect rev17d-3: they trained silently)."""

import logging

from datasets import Dataset

from alignkit.data.chat_rows import check_rows
from alignkit.models import apply_contract
from alignkit.testing.families import SPECS, family_tokenizer


def _rows(reply: str) -> Dataset:
    return Dataset.from_list(
        [{"messages": [{"role": "user", "content": f"What is {i} + 2?"}, {"role": "assistant", "content": reply}]} for i in range(3)]
    )  # fmt: skip


def test_deepseek_rows_without_the_think_opening_are_said(caplog):
    tok = family_tokenizer("deepseek_r1_distill")
    apply_contract(tok, chat=True, assistant_only_loss=True)
    with caplog.at_level(logging.WARNING, logger="alignkit.data.chat_rows"):
        check_rows(tok, _rows("It is 4."), "plain.jsonl")
    assert "plain.jsonl: in 3 rows an assistant reply does not start with '<think>\\n'" in caplog.text
    assert tok.alignkit_template.features.prompt_extra == "<think>\n"
    caplog.clear()
    think = "<think>\nAdd them.\n</think>\n\nIt is 4."
    with caplog.at_level(logging.WARNING, logger="alignkit.data.chat_rows"):
        check_rows(tok, _rows(think), "think.jsonl")
    assert "does not start with" not in caplog.text
    # and such a row renders with the generation prompt as its prefix: the model is trained where it is asked
    chat = [{"role": "user", "content": "2+2?"}]
    asked = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert tok.apply_chat_template([*chat, {"role": "assistant", "content": think}], tokenize=False).startswith(asked)


def test_other_families_ask_where_their_replies_start():
    for family in SPECS:
        if family != "deepseek_r1_distill":
            tok = family_tokenizer(family)
            apply_contract(tok, chat=True, assistant_only_loss=True)
            assert tok.alignkit_template.features.prompt_extra == "", family


def test_a_rejected_reply_is_checked_as_a_chosen_one(caplog):
    """Defect rev17d-4: a preference row's rejected reply was never rendered by the checks: reasoning_content or a
    tool call the template drops (Llama 3.0 renders neither) trained a rejected reply with that part silently gone
    (a dropped call: an empty reply). Now refused with the row, as in a chosen reply; Qwen3's earlier turns that
    leave out an inline <think> are counted like reasoning_content."""
    import pytest

    from alignkit.errors import DataError

    tok = family_tokenizer("llama3")
    apply_contract(tok, chat=True)
    prompt = [{"role": "user", "content": "2+2?"}]
    ok = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "4"}]}
    thought = {**ok, "rejected": [{"role": "assistant", "content": "5", "reasoning_content": "guess"}]}
    call = {**ok, "rejected": [{"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {}}}]}]}  # fmt: skip
    with pytest.raises(DataError, match=r"dpo.jsonl.*row 2.*reasoning_content"):
        check_rows(tok, Dataset.from_list([{**ok, "rejected": [{"role": "assistant", "content": "5"}]}, thought]), "dpo.jsonl")  # fmt: skip
    with pytest.raises(DataError, match=r"row 1.*uses tools"):
        check_rows(tok, Dataset.from_list([call]), "dpo.jsonl")
    qwen = family_tokenizer("qwen3")
    apply_contract(qwen, chat=True, assistant_only_loss=True)
    inline = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>count</think>4"},
              {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="alignkit.data.chat_rows"):
        check_rows(qwen, Dataset.from_list([{"messages": inline}]), "sft.jsonl")
    assert "sft.jsonl: in 1 rows the qwen3 template leaves out the reasoning of earlier assistant turns" in caplog.text
