"""What each trl trainer assumes of its rows, made true and checked before step 1 (issue 37), on the tiny Llama:

- KTO: no KL pair shares its row's prompt; prompts are held out whole; an eval prompt never trains.
- DPO, KTO, ORPO, SimPO, reward: 0 rows train two end-of-turn tokens (trl's experimental ORPO/CPO append eos after
  ``<|im_end|>\\n``), on a ChatML tokenizer and on a base-style one whose eos is not the end-of-turn.
- GRPO on the base-style tokenizer: sampling stops on the end-of-turn; ``completions/stopped_ratio`` is logged.
- DPO rows with a message prompt and text replies train (each reply is one assistant message).
"""

from __future__ import annotations

import json
import logging
import random
import shutil

import pytest
from conftest import log_history, run_recipe, write_jsonl

from alignkit.config.args import DataArguments, DatasetSource
from alignkit.data.pairing import kl_order, kl_shares_prompt, prompt_key
from alignkit.data.schemas import DPO, KTO
from alignkit.data.sources import load_datasets
from alignkit.errors import DataError
from alignkit.testing.tiny import tiny_model_path
from alignkit.train import runner
from alignkit.train.assumptions import doubled_stop_rows

FAST = ["--disable_tqdm", "true", "--save_strategy", "no", "--gradient_checkpointing", "false", "--lora_dropout", "0",
        "--load_in_4bit", "false", "--logging_steps", "1", "--seed", "0"]  # fmt: skip
WORDS = "the a of to in and is for model data user city paris london alice bob cat dog bird red green blue".split()


def chat_pairs(n: int, seed: int = 0, text_replies: bool = False) -> list[dict]:
    """``n`` preference pairs on distinct chat prompts; replies as assistant messages (or as text)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = [{"role": "user", "content": f"question {i}: " + " ".join(rng.choice(WORDS) for _ in range(4))}]
        replies = [" ".join(rng.choice(WORDS) for _ in range(3)) + end for end in (" good", " bad")]
        if not text_replies:
            replies = [[{"role": "assistant", "content": r}] for r in replies]
        rows.append({"prompt": prompt, "chosen": replies[0], "rejected": replies[1]})
    return rows


def base_style_llama(tmp_path, stops_at_once: bool = False):
    """tiny:llama as a base checkpoint ships (Qwen2.5-base style): eos ``<|endoftext|>``, while its chat template
    ends turns with ``<|im_end|>``. ``stops_at_once``: the weights make ``<|im_end|>`` nearly certain at every
    position (a residual dimension held at +10, the only one the final norm passes, read only by that row of the
    LM head), so a sampler that stops on it ends every completion after one token."""
    folder = tmp_path / "llama-base-style"
    shutil.copytree(tiny_model_path("llama"), folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["eos_token"] = "<|endoftext|>"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    eos, end = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.config.eos_token_id = model.generation_config.eos_token_id = eos
    if stops_at_once:
        import torch

        with torch.no_grad():
            model.model.embed_tokens.weight[:, 0] = 10.0
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight[0, :] = 0.0
                layer.mlp.down_proj.weight[0, :] = 0.0
            model.model.norm.weight.zero_()
            model.model.norm.weight[0] = 1.0
            model.lm_head.weight[:, 0] = 0.0
            model.lm_head.weight[end, 0] = 50.0
    model.save_pretrained(folder)
    return folder, eos, end


def spy_trainer(monkeypatch) -> dict:
    """Keep the trainer a recipe hands to Run.train, and what it prepared before alignkit's checks ran."""
    seen: dict = {}
    train = runner.Run.train

    def spy(self, trainer, **kwargs):
        seen["trainer"] = trainer
        seen["doubled_before"] = doubled_stop_rows(trainer.train_dataset, trainer.processing_class)
        return train(self, trainer, **kwargs)

    monkeypatch.setattr(runner.Run, "train", spy)
    return seen


# ------------------------------------------------------------------------------------------------------ case 1: KTO
def test_kto_kl_pairs_never_pair_a_prompt_with_its_own_reply(tmp_path, monkeypatch):
    """64 pairs unpaired to 128 rows, no test_size: laid out as trl gets them (chosen, rejected, ...), 64 of 128 KL
    pairs would be a prompt with its own other reply; alignkit's order leaves 0, on trl's own prepared rows."""
    data = write_jsonl(tmp_path / "pairs.jsonl", chat_pairs(64))
    unpaired = load_datasets(DataArguments(datasets=[DatasetSource(path=str(data))]), KTO)["train"]
    keys = [prompt_key(row) for row in unpaired]
    assert len(keys) == 128 and len(kl_shares_prompt(keys, 4)) == 64  # the failure, as it was
    ordered = kl_order(unpaired, 4)
    assert len(ordered) == 128 and kl_shares_prompt([prompt_key(r) for r in ordered], 4) == []
    assert sum(ordered["label"][:4]) == 2  # each batch holds desirable and undesirable rows alike

    seen = spy_trainer(monkeypatch)
    out = tmp_path / "kto"
    run_recipe("kto", ["--model_name_or_path", "tiny:llama", "--datasets", str(data), "--max_steps", "1",
                       "--per_device_train_batch_size", "4", "--max_length", "64", "--output_dir", str(out), *FAST])  # fmt: skip
    prepared = seen["trainer"].train_dataset
    assert len(prepared) == 128 and kl_shares_prompt(prepared["prompt_ids"], 4) == []
    # trl's own KL completions: each row's is the previous row's completion in its batch of 4, never its sibling's
    for j in range(0, 128, 4):
        block = prepared.select(range(j, j + 4))
        assert block["KL_completion_ids"] == [block["completion_ids"][-1], *block["completion_ids"][:-1]]


def test_kto_holds_out_whole_pairs_and_refuses_an_eval_prompt_that_trains(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", chat_pairs(32))
    split = load_datasets(DataArguments(datasets=[DatasetSource(path=str(data))], test_size=8), KTO)
    train_keys = {prompt_key(r) for r in split["train"]}
    test_keys = [prompt_key(r) for r in split["test"]]
    assert len(split["test"]) == 8 and len(set(test_keys)) == 4  # 4 whole pairs: both replies held out
    assert not train_keys & set(test_keys) and len(split["train"]) == 56
    # the eval split given as a split of its own (a saved DatasetDict), sharing a prompt with training: refused
    import datasets

    pairs = chat_pairs(40)
    folder = tmp_path / "saved"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(pairs[:32]), "test": datasets.Dataset.from_list(pairs[31:36])}
    ).save_to_disk(str(folder))
    args = DataArguments(datasets=[DatasetSource(path=str(folder), test_split="test")])
    with pytest.raises(DataError, match=r"row 1: its prompt .* also the prompt of training row 63"):
        load_datasets(args, KTO)
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(pairs[:32]), "test": datasets.Dataset.from_list(pairs[32:36])}
    ).save_to_disk(str(folder))
    split = load_datasets(args, KTO)  # disjoint prompts: accepted
    assert len(split["test"]) == 8 and not {prompt_key(r) for r in split["train"]} & {
        prompt_key(r) for r in split["test"]
    }


# ------------------------------------------------------------------------------ case 2: one end-of-turn per reply
@pytest.mark.parametrize("tokenizer", ["chatml", "base_style"])
@pytest.mark.parametrize("stage", ["orpo", "simpo", "dpo", "kto", "reward"])
def test_every_preference_stage_trains_one_end_of_turn_per_reply(stage, tokenizer, tmp_path, monkeypatch):
    """trl's experimental ORPO/CPO append eos unless a reply's last token is eos: ChatML renders '<|im_end|>\\n', so
    every row trained '<|im_end|>\\n<|im_end|>' (or '<|im_end|>\\n<|endoftext|>' on a base-style tokenizer). After
    alignkit's preparation 0 rows do, in every preference stage, and each ORPO/SimPO reply ends on <|im_end|>."""
    model = "tiny:llama" if tokenizer == "chatml" else str(base_style_llama(tmp_path)[0])
    data = write_jsonl(tmp_path / "pairs.jsonl", chat_pairs(16))
    seen = spy_trainer(monkeypatch)
    run_recipe(stage, ["--model_name_or_path", model, "--datasets", str(data), "--max_steps", "1",
                       "--per_device_train_batch_size", "4", "--max_length", "64",
                       "--output_dir", str(tmp_path / stage), *FAST])  # fmt: skip
    trainer = seen["trainer"]
    prepared, tok = trainer.train_dataset, trainer.processing_class
    if stage in ("orpo", "simpo"):
        assert seen["doubled_before"] == len(prepared) == 16  # trl's own output: every row
        end = tok.convert_tokens_to_ids("<|im_end|>")
        for labels in [*prepared["chosen_labels"], *prepared["rejected_labels"]]:
            assert [t for t in labels if t != -100][-1] == end
    assert doubled_stop_rows(prepared, tok) == 0


# ------------------------------------------------------------------------------------- case 3: GRPO stops sampling
GRPO = ["--datasets", "recipes/tiny/data/grpo.jsonl", "--reward_funcs", "alignkit.testing.rewards:plain_letters",
        "--num_generations", "4", "--per_device_train_batch_size", "8", "--max_completion_length", "12",
        "--max_steps", "1", "--beta", "0", *FAST]  # fmt: skip


def test_grpo_sampling_stops_on_the_end_of_turn_of_a_base_style_tokenizer(tmp_path, monkeypatch, caplog):
    """eos <|endoftext|>, turns end <|im_end|>, a model that ends every turn at once: 0 of 8 completions run on
    (clipped_ratio 0, stopped_ratio 1). Without the stop ids on the generation config, 8 of 8 ran to
    max_completion_length and the run warned once that stopped_ratio stayed 0."""
    folder, eos, end = base_style_llama(tmp_path, stops_at_once=True)
    out = tmp_path / "grpo"
    run_recipe("grpo", ["--model_name_or_path", str(folder), "--output_dir", str(out), *GRPO])
    step = next(e for e in log_history(out) if "completions/clipped_ratio" in e)
    assert step["completions/clipped_ratio"] == 0 and step["completions/stopped_ratio"] == 1, step
    assert step["completions/mean_length"] == 1, step  # the end-of-turn, then nothing

    monkeypatch.setattr(runner, "set_stop_ids", lambda model, tokenizer: None)  # the sampler as trl configures it
    with caplog.at_level(logging.WARNING, logger="alignkit"):
        run_recipe("grpo", ["--model_name_or_path", str(folder), "--output_dir", str(tmp_path / "no-stop"), *GRPO])
    step = next(e for e in log_history(tmp_path / "no-stop") if "completions/clipped_ratio" in e)
    assert step["completions/clipped_ratio"] == 1 and step["completions/stopped_ratio"] == 0, step
    assert sum("stopped_ratio stayed 0" in r.getMessage() for r in caplog.records) == 1


# ------------------------------------------------------------------------- case 7: message prompt, text replies
def test_dpo_rows_with_a_message_prompt_and_text_replies_train(tmp_path, monkeypatch):
    """trl raised 'TypeError: can only concatenate list' after the model loaded; each text reply is now one
    assistant message, and the reverse mix (a text prompt, message replies) is a DataError naming the row."""
    data = write_jsonl(tmp_path / "mixed.jsonl", chat_pairs(8, text_replies=True))
    rows = load_datasets(DataArguments(datasets=[DatasetSource(path=str(data))]), DPO)["train"]
    assert rows[0]["chosen"] == [{"role": "assistant", "content": chat_pairs(8, text_replies=True)[0]["chosen"]}]
    out = tmp_path / "dpo"
    run_recipe("dpo", ["--model_name_or_path", "tiny:llama", "--datasets", str(data), "--max_steps", "1",
                       "--per_device_train_batch_size", "4", "--output_dir", str(out), *FAST])  # fmt: skip
    assert any("loss" in e for e in log_history(out))
    reverse = [{**r, "prompt": r["prompt"][0]["content"]} for r in chat_pairs(4)]
    bad = write_jsonl(tmp_path / "reverse.jsonl", reverse)
    with pytest.raises(DataError, match=r"row 1.*chosen/rejected are chat messages but prompt is text"):
        load_datasets(DataArguments(datasets=[DatasetSource(path=str(bad))]), DPO)
