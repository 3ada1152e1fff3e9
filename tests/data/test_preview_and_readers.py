"""Issue 39, items 8 and 9, on hand-written files in their published layouts (alignkit.testing.published):
`alignkit data preview` continues a stage not trained yet from its chain's base model, shows DPO rows prompt
first and whole with --full, previews task heads (CoNLL files, a held-out file as the eval split) with the length
distribution per split and the verdict the run will reach, and shows a refused CoNLL sentence beside its refusal;
`alignkit generate`/`eval` read held-out rows in the training formats (alpaca JSON array, hh .jsonl.gz) through the
training readers; ShareGPT `function_call`/`observation` turns (LLaMA-Factory's glaive demo) become `tool_calls` /
`tool` messages and train. tiny models; nothing here trains more than a label preview."""

from __future__ import annotations

import json
import re

import datasets
import pytest
import yaml

from alignkit.config.args import DatasetSource
from alignkit.data.formats import convert_source
from alignkit.errors import DataError
from alignkit.testing.published import alpaca_records, write_conll, write_hh

GLAIVE_TOOLS = json.dumps([{"name": "calculator", "description": "Evaluate an arithmetic expression.",
                            "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}}}])  # fmt: skip


def glaive_row(a: int, b: int) -> dict:
    """LLaMA-Factory's glaive_toolcall_en_demo layout: sharegpt turns with function_call / observation, tools as
    JSON text."""
    return {"conversations": [
        {"from": "human", "value": f"What is {a} + {b}?"},
        {"from": "function_call", "value": json.dumps({"name": "calculator", "arguments": {"expression": f"{a} + {b}"}})},
        {"from": "observation", "value": json.dumps({"result": a + b})},
        {"from": "gpt", "value": f"It is {a + b}."},
    ], "tools": GLAIVE_TOOLS}  # fmt: skip


def _cli(argv, capsys) -> tuple[int, str]:
    from alignkit.cli import main as cli

    code = cli(argv)
    return code, capsys.readouterr().out


def test_sharegpt_function_call_and_observation_turns_are_tool_calls_and_tool_messages(tmp_path):
    rows = datasets.Dataset.from_list([glaive_row(23, 45)])
    out = convert_source(rows, DatasetSource(path="glaive.json"), "sft", "glaive.json")[0]
    call = {"type": "function", "function": {"name": "calculator", "arguments": '{"expression": "23 + 45"}'}}
    assert out["tools"] == GLAIVE_TOOLS
    assert [(m["role"], m["content"]) for m in out["messages"]] == [
        ("user", "What is 23 + 45?"), ("assistant", ""), ("tool", '{"result": 68}'), ("assistant", "It is 68."),
    ]  # fmt: skip
    assert out["messages"][1]["tool_calls"] == [call]
    bad = datasets.Dataset.from_list([{"conversations": [{"from": "human", "value": "Hi"},
                                                         {"from": "function_call", "value": "calculator(1)"}]}])  # fmt: skip
    with pytest.raises(DataError, match=r"row 1: sharegpt: turn 2 \(function_call\) is not JSON"):
        convert_source(bad, DatasetSource(path="bad.json"), "sft", "bad.json")


def test_glaive_tool_rows_preview_with_the_call_trained_and_the_result_not(tmp_path, capsys):
    data = tmp_path / "glaive_toolcall_en_demo.json"
    data.write_text(json.dumps([glaive_row(23, 45), glaive_row(12, 30)]))  # a JSON array, as published
    code, out = _cli(["data", "preview", "sft", "--config", "recipes/tiny/sft.yaml", "--datasets", str(data),
                      "--test_size", "0", "--load_in_4bit", "false", "--chat_template", "qwen3", "--max_length", "1024",
                      "--config_overrides", '{"max_position_embeddings": 1024}', "--output_dir",
                      str(tmp_path / "out")], capsys)  # fmt: skip
    assert code == 0, out
    assert f"== {data} [train]: format sharegpt (detected); 2 rows pass the sft checks" in out
    trained = "".join(part.split("]")[0] for part in out[out.index("label preview:") :].split("[")[1:])
    assert '{"name": "calculator", "arguments": {"expression": "23 + 45"}}' in trained
    assert "It is 68." in trained and '{"result": 68}' not in trained


def _chain(tmp_path) -> tuple:
    """A copy of the tiny sft -> dpo chain whose SFT output does not exist yet."""
    sft, dpo = yaml.safe_load(open("recipes/tiny/sft.yaml")), yaml.safe_load(open("recipes/tiny/dpo.yaml"))
    sft["output_dir"] = str(tmp_path / "never" / "sft")
    dpo["model_name_or_path"] = sft["output_dir"]
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(sft))
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(dpo))
    return tmp_path / "dpo.yaml", sft["output_dir"]


def test_preview_of_a_stage_whose_input_is_not_trained_yet_uses_the_chains_base(tmp_path, capsys):
    recipe, sft_out = _chain(tmp_path)
    data = write_hh(tmp_path / "harmless-base" / "train.jsonl.gz", n=12)
    argv = ["data", "preview", "dpo", "--config", str(recipe), "--datasets", str(data), "--test_size", "0",
            "--output_dir", str(tmp_path / "dpo_out")]  # fmt: skip
    code, out = _cli(argv, capsys)  # the empty final reply of row 4: refused, shown beside the refusal
    assert (
        code == 2 and f"is not trained yet ({tmp_path / 'sft.yaml'} writes {sft_out}): previewed on tiny:llama" in out
    )
    assert "refused:" in out and "turn 4 (assistant) is empty" in out and "   row 4 as read:" in out
    code, out = _cli([*argv, "--on_bad_rows", "skip", "--max_bad_rows", "1", "--full"], capsys)
    assert code == 0, out
    rows = [line.strip() for line in out.splitlines() if line.startswith('   {"')]
    assert rows and all(r.startswith('{"prompt": [') and r.index('"chosen"') < r.index('"rejected"') for r in rows)
    assert all(json.loads(r)["rejected"] for r in rows)  # whole rows with --full: each line is its row's JSON
    assert "label preview:" in out and not (tmp_path / "dpo_out").exists()
    assert "lengths in tokens: p50 " in out and "max_length 160 cuts 0 of 11 rows (0.0%)" in out


def test_preview_prints_the_length_distribution_and_the_refusal_the_run_will_reach(tmp_path, capsys):
    data = write_hh(tmp_path / "train.jsonl.gz", n=12)
    argv = ["data", "preview", "sft", "--config", "recipes/tiny/sft.yaml", "--datasets", str(data), "--test_size", "0",
            "--on_bad_rows", "skip", "--max_bad_rows", "1", "--output_dir", str(tmp_path / "out")]  # fmt: skip
    code, out = _cli([*argv, "--max_length", "48"], capsys)
    assert code == 0, out
    line = next(line for line in out.splitlines() if "lengths in tokens: p50" in line)
    assert "max_length 48 cuts 11 of 11 rows (100.0%): the run refuses this (max_truncated_fraction 0.05)" in line
    fits = int(line.split("Fix: max_length: ")[1].split()[0])
    code, out = _cli([*argv, "--max_length", str(fits)], capsys)  # the length it names keeps the limit
    assert code == 0 and f"max_length {fits} cuts 0 of 11 rows" in out, out


def test_task_preview_reads_conll_files_with_the_held_out_file_as_eval(tmp_path, capsys):
    train, test = write_conll(tmp_path)
    sources = json.dumps([str(train), {"path": str(test), "role": "eval"}])
    code, out = _cli(["data", "preview", "task", "--config", "recipes/tiny/task_ner.yaml", "--datasets", sources],
                     capsys)  # fmt: skip
    assert code == 0, out
    assert f"== {train} [train]: format conll (detected); 12 rows pass the task checks; columns" in out
    assert (
        f"== {test} [eval]: format conll (detected); 8 rows pass the task checks, the eval split (never trained)" in out
    )
    assert '{"tokens": ["Alice", "lives", "in", "Paris", "."], "ner_tags": ["B-PER", "O", "O", "B-LOC", "O"]}' in out
    assert out.count("lengths in tokens: p50") == 2 and "cuts 0 of 12 rows" in out
    bad = tmp_path / "bad.conll"
    bad.write_text(train.read_text().replace("Paris NNP B-NP I-LOC", "Paris NNP B-NP I-TOWN"))
    code, out = _cli(["data", "preview", "task", "--config", "recipes/tiny/task_ner.yaml", "--datasets", str(bad)],
                     capsys)  # fmt: skip
    assert code == 2 and f"refused: {bad}, row 6: word 4 'Paris': 'ner_tags' label 'B-TOWN'" in out
    assert "   row 3 as read:" in out and '"Paris"' in out  # the sentence holding line 6, as read


def test_generate_and_eval_read_held_out_rows_in_the_training_formats(tmp_path):
    from alignkit.export.evaluate import read_eval_rows
    from alignkit.export.generate import read_prompts

    alpaca = tmp_path / "alpaca_en_demo.json"
    alpaca.write_text(json.dumps(alpaca_records(4)))  # LLaMA-Factory's JSON array
    conversations, references = read_eval_rows(alpaca)
    assert references == [r["output"] for r in alpaca_records(4)]
    assert conversations[0] == [{"role": "user", "content": "Say where Alice lives.\n\nAnswer in one sentence (0)."}]
    rows, prompts = read_prompts(alpaca)
    assert rows == alpaca_records(4) and prompts == conversations  # written back as read, with the reply
    hh = write_hh(tmp_path / "test.jsonl.gz", n=3)  # hh-rlhf as published: the chosen final reply is the reference
    conversations, references = read_eval_rows(hh)
    assert references[0] == "Alice lives in Paris and works at the bakery."
    assert [m["role"] for m in conversations[0]] == ["user", "assistant", "user"]
    empty = write_hh(tmp_path / "bad" / "test.jsonl.gz", n=5)  # row 4's empty reply: named, before a model loads
    with pytest.raises(DataError, match=r"test.jsonl.gz, row 4: hh: turn 4 \(assistant\) is empty"):
        read_eval_rows(empty)
    own = tmp_path / "held_out.jsonl"  # alignkit's own layout keeps working
    own.write_text(json.dumps({"prompt": "2 + 2?", "answer": "4"}) + "\n")
    assert read_eval_rows(own) == ([[{"role": "user", "content": "2 + 2?"}]], ["4"])


def test_preview_of_prompt_rows_prints_their_lengths_and_what_trl_does_with_them(tmp_path, capsys):
    """GRPO/RLOO/online DPO rows are prompts: the preview prints their lengths as trl tokenizes them before generating
    (the template with the generation prompt). GRPO keeps every prompt whole (trl 1.16 has no max_prompt_length),
    so the line gives the longest sequence; online DPO cuts a prompt's start beyond max_length - max_new_tokens, and
    above max_truncated_fraction names the max_length that keeps the limit, which then cuts none."""
    from alignkit.config import ModelArguments
    from alignkit.models.tokenizer import load_tokenizer

    system = {"role": "system", "content": "You are a careful calculator."}
    rows = [{"prompt": [system, {"role": "user", "content": f"What is {i} + {i + 1}?" + " Explain." * (30 * (i < 2))}],
             "answer": 2 * i + 1} for i in range(20)]  # fmt: skip
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = load_tokenizer(ModelArguments(model_name_or_path="tiny:llama"), chat=True)  # where the tiny chain starts
    lengths = [len(tok.apply_chat_template(r["prompt"], add_generation_prompt=True, return_dict=True)["input_ids"])
               for r in rows]  # fmt: skip
    common = ["--datasets", str(data), "--test_size", "0", "--output_dir", str(tmp_path / "out")]
    code, out = _cli(["data", "preview", "grpo", "--config", "recipes/tiny/grpo.yaml", *common], capsys)
    assert code == 0, out
    assert (f"p99 {max(lengths)}, max {max(lengths)}; grpo keeps every prompt whole (trl has no max_prompt_length): "
            f"the longest sequence is {max(lengths)} + max_completion_length 24 = {max(lengths) + 24} tokens") in out  # fmt: skip
    room = sorted(lengths)[-3] + 1  # the two long prompts do not fit: 10% of the rows
    argv = ["data", "preview", "online_dpo", "--config", "recipes/tiny/online_dpo.yaml", *common]
    code, out = _cli([*argv, "--max_length", str(room + 24)], capsys)
    line = next(line for line in out.splitlines() if "prompt lengths in tokens" in line)
    assert f"leaves {room} for a prompt: 2 of 20 prompts may lose their start (10.0%); above" in line, line
    fits = int(line.split("max_length: ")[-1].split()[0])
    code, out = _cli([*argv, "--max_length", str(fits)], capsys)  # keeps the limit: at most 1 of 20 (5%) cut
    assert code == 0 and re.search(rf"leaves {fits - 24} for a prompt: [01] of 20 prompts", out), out
    assert "above max_truncated_fraction" not in out


def test_generate_and_eval_render_tool_rows_with_their_tools_as_training_does(tmp_path, monkeypatch):
    """A row's tools reach generation: glaive rows (sharegpt, tools as JSON text; a .jsonl.gz copy) and alignkit's
    own layout (messages ending on the user, tools) are rendered with them. SFT trains on the glaive rows (tiny:llama
    with Qwen2.5's stock template); the prompt `alignkit generate` feeds the trained model is, token for token, the
    start of the row as training rendered it, the rest being the final reply and its end-of-turn."""
    import gzip

    from conftest import run_recipe
    from transformers import LogitsProcessor, LogitsProcessorList

    from alignkit.export.evaluate import read_eval_rows
    from alignkit.export.generate import generate_file, load_for_generation, prompt_text
    from alignkit.train import runner

    data = tmp_path / "glaive_toolcall_en_demo.json"
    data.write_text(json.dumps([glaive_row(23, 45), glaive_row(12, 30)]))
    trainers, real_train = [], runner.Run.train
    monkeypatch.setattr(runner.Run, "train", lambda self, trainer, **kw: trainers.append(trainer) or real_train(self, trainer, **kw))  # fmt: skip
    out = tmp_path / "sft"
    run_recipe("sft", ["--config", "recipes/tiny/sft.yaml", "--datasets", str(data), "--test_size", "0",
                       "--load_in_4bit", "false", "--chat_template", "qwen2_5", "--max_length", "1024",
                       "--config_overrides", '{"max_position_embeddings": 1024}', "--max_steps", "1",
                       "--save_strategy", "no", "--disable_tqdm", "true", "--output_dir", str(out)])  # fmt: skip
    tok = trainers[-1].processing_class
    trained = [tok.decode(ids) for ids in trainers[-1].train_dataset["input_ids"]]

    class Prompts(LogitsProcessor):  # max_new_tokens 1: called once per generate() call, on its prompt
        def __init__(self):
            self.seen = []

        def __call__(self, input_ids, scores):
            self.seen.append(tok.decode(input_ids[0]))
            return scores

    model, tokenizer = load_for_generation(out)
    gz = tmp_path / "held_out.jsonl.gz"
    gz.write_bytes(
        gzip.compress("".join(json.dumps(glaive_row(a, b)) + "\n" for a, b in ((23, 45), (12, 30))).encode())
    )
    own = tmp_path / "own.jsonl"
    own.write_text(json.dumps({"messages": [{"role": "user", "content": "What is 23 + 45?"}], "tools": GLAIVE_TOOLS}))
    for prompts in (data, gz, own):
        seen = Prompts()
        generate_file(model, tokenizer, prompts, tmp_path / "replies.jsonl", batch_size=1, max_new_tokens=1,
                      logits_processor=LogitsProcessorList([seen]))  # fmt: skip
        for prompt, text, reply in zip(seen.seen, trained, ("It is 68.", "It is 42.")):
            assert '"name": "calculator"' in prompt and text.startswith(prompt), (prompt, text)
            if prompts != own:  # the whole conversation up to its final reply
                assert text[len(prompt) :] == f"{reply}<|im_end|>\n"
        assert len(seen.seen) == (1 if prompts == own else 2)
    conversations, references, tools = read_eval_rows(gz, with_tools=True)  # eval: the same prompts, the same tools
    assert references == ["It is 68.", "It is 42."]
    assert [trained[i].startswith(prompt_text(tokenizer, c, t)) for i, (c, t) in enumerate(zip(conversations, tools))] == [True, True]  # fmt: skip
    assert read_eval_rows(gz, with_tools=True)[2][0] == json.loads(GLAIVE_TOOLS)
