"""What SFT trains is what the user meant (issue 16): each assistant turn's labels end on a stop token, a recipe's or
tokenizer's template is checked by rendering and never replaced, truncation that cuts the stop token is counted,
and splits that end up empty are errors naming the split. One test per case of the issue, on inputs built here:
tiny:llama_base is a base Llama-2-style tokenizer (SentencePiece-style BPE, <s>/</s>/<unk>, no chat template)."""

from __future__ import annotations

import json
import logging

import pytest
from conftest import TINY_DATA, run_recipe
from transformers import AutoTokenizer

from alignkit.data.templates import CHATML, CHATML_EOS, assistant_spans
from alignkit.errors import ConfigError, DataError, PreflightError

TINY = ["--config", "recipes/tiny/sft.yaml", "--max_steps", "1", "--save_steps", "100", "--disable_tqdm", "true"]
ROWS = [json.loads(line) for line in (TINY_DATA / "sft.jsonl").read_text().splitlines()]


@pytest.fixture
def trainers(monkeypatch):
    """Every trainer the recipes build, so a test can look at what was tokenized."""
    import trl

    built = []
    original = trl.SFTTrainer.__init__

    def record(self, *args, **kwargs):
        original(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(trl.SFTTrainer, "__init__", record)
    return built


def _stops_per_turn(trainer) -> list[tuple[int, int]]:
    """(trained spans, stop tokens among the labels) of every tokenized training row."""
    tokenizer = trainer.processing_class
    stops = set(tokenizer.alignkit_stop_ids)
    counts = []
    for labels in trainer.train_dataset["labels"]:
        spans = assistant_spans([label != -100 for label in labels])
        counts.append((len(spans), sum(label in stops for label in labels)))
    return counts


# ---------------------------------------------------------------- case 1: a base vocabulary without chat tokens
def test_base_tokenizer_gets_a_template_that_ends_turns_with_its_own_eos(trainers, tmp_path):
    run_recipe("sft", [*TINY, "--model_name_or_path", "tiny:llama_base", "--output_dir", str(tmp_path / "o")])
    trainer = trainers[0]
    tokenizer = trainer.processing_class
    assert tokenizer.chat_template == CHATML_EOS and tokenizer.alignkit_stop_ids == [tokenizer.eos_token_id]
    counts = _stops_per_turn(trainer)
    assert counts and all(spans >= 1 and stops == spans for spans, stops in counts), counts  # one stop per turn
    assert (tmp_path / "o" / "chat_template.jinja").read_text() == CHATML_EOS


def test_chatml_on_a_vocabulary_without_im_end_adds_it_or_is_refused_with_the_fix(tmp_path):
    """chat_template: chatml on a base vocabulary adds <|im_end|> (as trl's clone_chat_template does; its rows train,
    tests/data/test_chat_families.py); a 4-bit backbone cannot grow its embeddings: refused before training."""
    argv = ["--model_name_or_path", "tiny:llama_base", "--chat_template", "chatml", "--output_dir", str(tmp_path / "o")]
    with pytest.raises(PreflightError, match=r"4-bit model's embeddings.*chat_template: chatml_eos"):
        run_recipe("sft", [*TINY, *argv])
    assert not (tmp_path / "o").exists()


def test_sft_on_a_base_tokenizer_then_merge_stops_generating(tmp_path):
    """End to end: SFT on tiny:llama_base, merge; the merged model's own generation config stops generate() on eos
    (before the fix: 60 of 60 new tokens, never stopping). On any weights: each greedy reply with the saved
    generation config is the continuation without any stop token, cut just after its first eos. The run is trained
    enough that most replies stop within 60 tokens (tests.regression.margins); at least one must, so the cut is
    tested."""
    import torch
    from regression.margins import GENERATION_SFT, cut_at_stop, greedy_trace
    from transformers import AutoModelForCausalLM

    from alignkit.export.merge import merge_adapter

    out = tmp_path / "sft"
    run_recipe("sft", [*GENERATION_SFT, "--output_dir", str(out)])
    merged = merge_adapter(out, tmp_path / "merged").output_dir
    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert json.loads((merged / "generation_config.json").read_text())["eos_token_id"] == tokenizer.eos_token_id
    stopped = 0
    for row in ROWS[:6]:
        prompt = tokenizer.apply_chat_template(
            row["messages"][:-1], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            new = model.generate(**prompt, max_new_tokens=60, do_sample=False)[0, prompt["input_ids"].shape[1] :]
        (free,), _ = greedy_trace(model, prompt["input_ids"], 60, attention_mask=prompt["attention_mask"])
        kept, stops = cut_at_stop(free, {tokenizer.eos_token_id})
        assert new.tolist() == (kept + [tokenizer.eos_token_id] if stops else kept), tokenizer.decode(new)
        stopped += stops
    assert stopped >= 1, "no reply ended on eos within 60 tokens"


# ---------------------------------------------------------------- case 2: the end of turn outside the generation block
OUTSIDE = CHATML.replace(
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}",
    "{% generation %}{{- message['content'] }}{% endgeneration %}{{- '<|im_end|>' }}",
)


def test_end_of_turn_outside_the_generation_block_is_refused(tmp_path):
    template = tmp_path / "outside.jinja"
    template.write_text(OUTSIDE)
    with pytest.raises(ConfigError, match=r"trained part of an assistant turn ends on .*inside \{% generation %\}"):
        run_recipe("sft", [*TINY, "--chat_template", str(template), "--output_dir", str(tmp_path / "o")])


# ---------------------------------------------------------------- case 3: whitespace-control generation tags
SYSTEM_DEFAULT = (
    "{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are a helpful calculator.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{%- generation -%}{{- message['content'] + '<|im_end|>' }}{%- endgeneration -%}"
    "{{- '\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
HASH_TURNS = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}{{- '### Assistant:\\n' }}"
    "{%- generation -%}{{- message['content'] + eos_token }}{%- endgeneration -%}{{- '\\n' }}"
    "{%- else %}{{- '### ' + message['role'] | capitalize + ':\\n' + message['content'] + '\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '### Assistant:\\n' }}{%- endif %}"
)


@pytest.mark.parametrize("template", [SYSTEM_DEFAULT, HASH_TURNS], ids=["chatml-with-system-default", "hash-turns"])
def test_whitespace_control_generation_tags_are_kept_as_the_recipe_wrote_them(template, trainers, tmp_path):
    path = tmp_path / "template.jinja"
    path.write_text(template)
    run_recipe("sft", [*TINY, "--chat_template", str(path), "--output_dir", str(tmp_path / "o")])
    assert (tmp_path / "o" / "chat_template.jinja").read_text() == template  # never replaced
    counts = _stops_per_turn(trainers[0])
    assert all(spans >= 1 and stops == spans for spans, stops in counts), counts


# ---------------------------------------------------------------- case 5: truncation that cuts the stop token
def test_truncation_that_cuts_every_stop_token_is_refused_with_the_count(tmp_path):
    with pytest.raises(
        DataError, match=r"train split: max_length 80 cuts the stop token .* off 56 of 56 train rows.*Fix"
    ):
        run_recipe("sft", [*TINY, "--max_length", "80", "--output_dir", str(tmp_path / "o")])


def test_truncation_below_the_threshold_is_reported_with_the_count(tmp_path, caplog):
    argv = ["--max_length", "88", "--max_truncated_fraction", "0.9", "--output_dir", str(tmp_path / "o")]
    with caplog.at_level(logging.WARNING, logger="alignkit.train.checks"):
        run_recipe("sft", [*TINY, *argv])
    assert "cuts the stop token ('<|im_end|>') off 38 of 56 train rows (68%)" in caplog.text


# ---------------------------------------------------------------- case 6: tokenization empties the eval split
def test_an_eval_split_emptied_by_max_length_is_a_data_error(tmp_path):
    from datasets import Dataset, DatasetDict

    long = [{"messages": [{"role": "user", "content": "add these: " + " + ".join(["17"] * 80)},
                          {"role": "assistant", "content": "ANSWER: 1360"}]} for _ in range(4)]  # fmt: skip
    folder = tmp_path / "saved"
    DatasetDict(train=Dataset.from_list(ROWS[:16]), test=Dataset.from_list(long)).save_to_disk(str(folder))
    datasets = json.dumps([{"path": str(folder), "test_split": "test"}])
    with pytest.raises(DataError, match=r"test split: no rows left after tokenization .*max_length 128.*Fix"):
        run_recipe("sft", [*TINY, "--datasets", datasets, "--output_dir", str(tmp_path / "o")])


# ---------------------------------------------------------------- case 7: an empty split in a save_to_disk folder
def test_an_empty_saved_split_is_a_data_error_naming_it_and_unused_ones_are_not_loaded(tmp_path):
    from datasets import Dataset, DatasetDict

    folder = tmp_path / "saved"
    DatasetDict(train=Dataset.from_list(ROWS), test=Dataset.from_dict({"messages": []})).save_to_disk(str(folder))
    run_recipe("sft", [*TINY, "--datasets", f"[{folder}]", "--test_size", "0", "--output_dir", str(tmp_path / "a")])
    datasets = json.dumps([{"path": str(folder), "test_split": "test"}])
    with pytest.raises(DataError, match=rf"{folder} \[test\]: this split was saved with 0 rows. Fix"):
        run_recipe("sft", [*TINY, "--datasets", datasets, "--output_dir", str(tmp_path / "b")])


def test_dpo_truncation_that_cuts_responses_is_counted(tmp_path):
    argv = ["--config", "recipes/tiny/dpo.yaml", "--model_name_or_path", "tiny:llama", "--max_steps", "1"]
    with pytest.raises(DataError, match=r"max_length 90 cuts the stop token .* off 38 of 56 train rows"):
        run_recipe("dpo", [*argv, "--max_length", "90", "--output_dir", str(tmp_path / "o")])
