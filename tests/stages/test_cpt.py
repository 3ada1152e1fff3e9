"""CPT stage: recipes/cpt.py on the tiny Llama. Loss falls with QLoRA, LoRA and from scratch; every token of a packed
block is trained (eos too, when pad == eos); `accelerate launch` runs it end to end."""

import json
import shutil

import pytest
from conftest import accelerate_launch_one_process, run_recipe, train_losses
from safetensors import safe_open

TINY = ["--config", "recipes/tiny/cpt.yaml", "--test_size", "0", "--disable_tqdm", "true"]


def _falls(losses):
    third = max(1, len(losses) // 3)
    return sum(losses[-third:]) / third < sum(losses[:third]) / third - 0.05


@pytest.mark.parametrize(
    "argv",
    [[], ["--load_in_4bit", "false"]],
    ids=["qlora", "lora"],
)
def test_cpt_loss_falls(argv, tmp_path):
    run_recipe("cpt", [*TINY, *argv, "--max_steps", "8", "--output_dir", str(tmp_path)])
    losses = train_losses(tmp_path)
    assert len(losses) == 8 and _falls(losses), losses
    assert (tmp_path / "adapter_model.safetensors").is_file()


def test_cpt_from_scratch_trains_a_new_model(tmp_path):
    argv = "--from_scratch true --use_peft false --load_in_4bit false --max_steps 8".split()
    run_recipe("cpt", [*TINY, *argv, "--config_overrides", "{num_hidden_layers: 1}", "--output_dir", str(tmp_path)])
    losses = train_losses(tmp_path)
    assert len(losses) == 8 and _falls(losses), losses
    assert losses[0] > 5.5  # random init: about ln(vocab) = ln(512) = 6.2, nothing pretrained
    assert json.loads((tmp_path / "config.json").read_text())["num_hidden_layers"] == 1
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as weights:  # a full 1-layer model, not an adapter
        names = list(weights.keys())
    assert any("layers.0." in n for n in names) and not any("layers.1." in n or "lora" in n for n in names)


def test_every_block_token_is_trained_even_eos_when_pad_is_eos(tiny_llama, trainers, tmp_path, capsys):
    model = tmp_path / "pad_is_eos"  # as SmolLM2 and GPT-2 ship their tokenizers
    shutil.copytree(tiny_llama, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": config["eos_token"]}))
    out = tmp_path / "out"
    metrics = run_recipe(
        "cpt", [*TINY, "--model_name_or_path", str(model), "--output_dir", str(out), "--label_preview"]
    )
    assert metrics == {} and not out.exists(), (
        "label_preview must print and exit without training or writing (not even the folder)"
    )
    assert "64/64 tokens are trained" in capsys.readouterr().out
    trainer = trainers[0]
    assert trainer.processing_class.pad_token_id == trainer.processing_class.eos_token_id
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape == (4, 64)
    assert (batch["labels"] == batch["input_ids"]).all(), "a block token (e.g. a document-ending eos) is not trained"
    assert (batch["input_ids"] == trainer.processing_class.eos_token_id).any()


def test_accelerate_launch_cpt_saves_every_output(tmp_path):
    resolved = accelerate_launch_one_process("cpt", TINY, tmp_path / "cpt", steps=2)
    assert resolved["CPTConfig"]["block_size"] == 64 and resolved["CPTConfig"]["max_steps"] == 2
