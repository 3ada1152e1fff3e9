"""Issue 36: every preference stage renders its chats with the run's family template, tools included. A prompt with
tools, an assistant tool call (arguments as a JSON string) and the tool's result, then chosen/rejected replies: the
prompt trl tokenizes is the family's rendering with the generation prompt, the reply the rendered rest with one
end-of-turn, the call's arguments printed once as an object (no second escaping)."""

from __future__ import annotations

import json

import pytest
from conftest import run_recipe, write_jsonl

from alignkit.data.chat_families import stock_template
from alignkit.train import runner

TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
PROMPT = [
    {"role": "user", "content": "What is 2 + 3?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}],
    },  # fmt: skip
    {"role": "tool", "name": "add", "content": "5"},
]
CHOSEN, REJECTED = "It is 5.", "It is 6."
ROW = {"prompt": PROMPT, "chosen": [{"role": "assistant", "content": CHOSEN}], "rejected": [{"role": "assistant", "content": REJECTED}]}  # fmt: skip


@pytest.fixture
def built(monkeypatch):
    """The trainers the recipes build (the run loop is not entered: only their tokenized rows are read)."""
    seen = []
    monkeypatch.setattr(runner.Run, "train", lambda self, trainer, **kw: seen.append(trainer) or {})
    return seen


def _object_prompt():
    prompt = json.loads(json.dumps(PROMPT))
    prompt[1]["tool_calls"][0]["function"]["arguments"] = {"a": 2, "b": 3}
    return prompt


@pytest.mark.parametrize("stage", ["dpo", "kto", "orpo", "simpo", "reward"])
def test_tool_prompts_render_with_the_family_template_and_keep_their_boundary(stage, built, tmp_path):
    if stage == "kto":  # DPO pairs unpaired, the tools given once for the whole source (data config)
        data = json.dumps([{"path": str(write_jsonl(tmp_path / "pref.jsonl", [ROW] * 4)), "tools": TOOLS}])
    else:
        data = str(write_jsonl(tmp_path / "pref.jsonl", [{**ROW, "tools": TOOLS}] * 4))
    argv = ["--config", f"recipes/tiny/{stage}.yaml", "--model_name_or_path", "tiny:llama", "--chat_template",
            "qwen2_5", "--load_in_4bit", "false", "--datasets", data, "--test_size", "0", "--eval_strategy",
            "no", "--max_steps", "1", "--max_length", "512", "--output_dir", str(tmp_path / "out")]  # fmt: skip
    if stage in ("dpo", "kto"):
        argv += ["--adapter_handoff", "continue"]
    run_recipe(stage, argv)
    trainer = built[-1]
    tok = trainer.processing_class
    assert tok.chat_template == stock_template("qwen2_5")  # no assistant-only loss here: the stock text itself
    prompt = _object_prompt()
    given = tok.apply_chat_template(prompt, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert '"arguments": {"a": 2, "b": 3}' in given and '"name": "add", "parameters"' in given  # call + schema
    row = trainer.train_dataset[0]
    decode = tok.decode
    if stage == "reward":  # whole conversations: the family's rendering of prompt + reply, one end-of-turn each
        for column, reply in (("chosen_ids", CHOSEN), ("rejected_ids", REJECTED)):
            full = tok.apply_chat_template([*prompt, {"role": "assistant", "content": reply}], tools=TOOLS, tokenize=False)  # fmt: skip
            assert decode(row[column]) == full and full.startswith(given)
            assert full[len(given) :] == f"{reply}<|im_end|>\n"
        return
    if stage in ("dpo", "kto"):
        prompt_ids = row["prompt_ids"]
        replies = [row["chosen_ids"], row["rejected_ids"]] if stage == "dpo" else [row["completion_ids"]]
    else:  # trl.experimental ORPO / CPO (SimPO): prompt + reply sequences
        prompt_ids = row["prompt_input_ids"]
        n = len(prompt_ids)
        assert row["chosen_input_ids"][:n] == prompt_ids == row["rejected_input_ids"][:n]
        replies = [row["chosen_input_ids"][n:], row["rejected_input_ids"][n:]]
    assert decode(prompt_ids) == given  # the boundary: the family's prompt with its generation prompt, exactly
    texts = [decode(r) for r in replies]
    if stage == "kto":  # unpaired rows (alignkit orders them for trl's KL pairing): either reply, one end-of-turn
        assert texts[0] in (f"{CHOSEN}<|im_end|>\n", f"{REJECTED}<|im_end|>\n")
        return
    assert texts[0].startswith(f"{CHOSEN}<|im_end|>\n")
    if stage == "dpo":
        assert texts[0] == f"{CHOSEN}<|im_end|>\n"  # one end-of-turn per reply
    if stage == "dpo":
        assert texts[1] == f"{REJECTED}<|im_end|>\n"


def test_sft_tool_rows_train_the_call_never_the_result(built, tmp_path):
    """SFT on tool rows through trl (installed qwen2_5 twin, assistant-only loss): the call and the final answer are
    trained, through <|im_end|>; the tool's result and the schema never."""
    messages = [*PROMPT, {"role": "assistant", "content": CHOSEN}]
    data = write_jsonl(tmp_path / "sft.jsonl", [{"messages": messages}] * 4)
    argv = ["--config", "recipes/tiny/sft.yaml", "--chat_template", "qwen2_5", "--load_in_4bit", "false",
            "--datasets", json.dumps([{"path": str(data), "tools": TOOLS}]), "--test_size", "0", "--max_steps", "1",
            "--max_length", "512", "--output_dir", str(tmp_path / "out")]  # fmt: skip
    run_recipe("sft", argv)
    trainer = built[-1]
    tok = trainer.processing_class
    batch = next(iter(trainer.get_train_dataloader()))
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    text = tok.decode(ids)
    trained = tok.decode([t for t, label in zip(ids, labels) if label != -100])
    assert '"name": "add", "parameters"' in text  # the source's tools, rendered
    # trl's Qwen2.5 twin marks from the newline after the role through the newline after <|im_end|>
    call = '\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call><|im_end|>\n'
    # padding-free batches (alignkit's default) hold several rows in one sequence: each restarts its positions
    rows = batch["position_ids"][0].tolist().count(0) if "position_ids" in batch else 1
    assert rows >= 1 and trained == (call + f"\n{CHOSEN}<|im_end|>\n") * rows
    assert "<tool_response>" not in trained and "5\n</tool_response>" in text


def test_grpo_prompts_render_with_the_family_template(built, tmp_path):
    """GRPO: the prompts trl tokenizes for generation are the family's rendering with its generation prompt."""
    prompt = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2 + 3?"}]
    data = write_jsonl(tmp_path / "grpo.jsonl", [{"prompt": prompt, "answer": 5}] * 4)
    argv = ["--config", "recipes/tiny/grpo.yaml", "--model_name_or_path", "tiny:llama", "--chat_template", "qwen2_5",
            "--load_in_4bit", "false", "--datasets", str(data), "--max_steps", "1",
            "--output_dir", str(tmp_path / "out")]  # fmt: skip
    run_recipe("grpo", argv)
    trainer = built[-1]
    tok = trainer.processing_class
    assert tok.chat_template == stock_template("qwen2_5")
    prompt_ids = trainer._tokenize_prompts([prompt])[0][0]  # what trl hands to generate()
    expected = tok.apply_chat_template(prompt, chat_template=stock_template("qwen2_5"), add_generation_prompt=True, tokenize=False)  # fmt: skip
    assert tok.decode(prompt_ids) == expected and expected.endswith("<|im_start|>assistant\n")
