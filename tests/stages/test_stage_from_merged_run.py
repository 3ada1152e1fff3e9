"""A stage started from a merged (or full-model) run folder trains its adapter on that folder's weights, so the
folder is the adapter's base: the run record names it, and everything that loads the run (load_trained, merge,
chat, RewardModel, a later stage) puts the adapter back on it, not on the base the merged run was trained from
(which would drop every earlier stage's weights without a word)."""

import json

import pytest
import torch
from conftest import run_recipe


def test_an_adapter_trained_on_a_merged_run_loads_on_that_merged_run(sft_3_steps_merged, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from alignkit.config.args import ModelArguments
    from alignkit.models import load_trained
    from alignkit.models.sources import resolve_source

    out = tmp_path / "sft2"
    run_recipe("sft", ["--config", "recipes/tiny/sft.yaml", "--model_name_or_path", str(sft_3_steps_merged),
                       "--load_in_4bit", "false", "--test_size", "0", "--max_steps", "1", "--save_strategy", "no",
                       "--disable_tqdm", "true", "--output_dir", str(out)])  # fmt: skip
    record = json.loads((out / "alignkit_run.json").read_text())
    assert record["base_model_args"]["model_name_or_path"] == str(sft_3_steps_merged)
    assert [e["stage"] for e in record["lineage"]] == ["sft", "merge", "sft"]  # the lineage still tells the story
    assert resolve_source(ModelArguments(model_name_or_path=str(out))).base == str(sft_3_steps_merged)

    # a record written before the fix named the merged run's own base (tiny:llama): the adapter still loads on the
    # folder it was trained on, which adapter_config.json names
    record["base_model_args"] = json.loads((sft_3_steps_merged / "alignkit_run.json").read_text())["base_model_args"]
    (out / "alignkit_run.json").write_text(json.dumps(record))
    assert resolve_source(ModelArguments(model_name_or_path=str(out))).base == str(sft_3_steps_merged)

    model, tokenizer = load_trained(out)
    merged_base = AutoModelForCausalLM.from_pretrained(sft_3_steps_merged, dtype=torch.float32)
    expected = PeftModel.from_pretrained(merged_base, out).eval()
    ids = tokenizer("What is 2 + 3?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, expected(ids).logits, atol=1e-5)


def test_a_reward_model_from_an_sft_adapter_is_told_to_start_from_its_merge(sft_3_steps, tmp_path):
    """The reward stage trains a new head, so it cannot continue an SFT adapter; the fix names the way that works:
    merge the SFT run, then start from the merged folder (which the test above shows loads on the right weights)."""
    from alignkit.errors import PreflightError

    out = tmp_path / "reward"
    with pytest.raises(PreflightError) as info:
        run_recipe("reward", ["--config", "recipes/tiny/reward.yaml", "--model_name_or_path", str(sft_3_steps),
                              "--output_dir", str(out)])  # fmt: skip
    assert f"alignkit merge {sft_3_steps}" in str(info.value)
    assert not (out / "alignkit_run.json").exists()
