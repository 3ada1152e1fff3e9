"""Safe defaults: tokens never reach a file the run writes or its console output; no pickles in the outputs; model
code from a model folder never runs unless trust_remote_code is set; pickle weights are refused (see the malformed
inputs table) unless allow_pickle_weights is set."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from conftest import run_recipe

from alignkit.config import SFTConfig, parse_recipe
from alignkit.models.loader import load_model
from alignkit.models.tokenizer import load_tokenizer

TOKENS = {
    "HF_TOKEN": "hf_envTokenMustNeverBeWritten0001",
    "WANDB_API_KEY": "wandbKeyMustNeverBeWritten00000000000002",
    "hub_token": "hf_recipeTokenMustNeverBeWritten0003",
}


def test_tokens_never_appear_in_any_file_the_run_writes(tmp_path, monkeypatch, capfd):
    out, wandb_dir = tmp_path / "out", tmp_path / "wandb"
    wandb_dir.mkdir()
    monkeypatch.setenv("HF_TOKEN", TOKENS["HF_TOKEN"])
    monkeypatch.setenv("WANDB_API_KEY", TOKENS["WANDB_API_KEY"])
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    argv = ["--config", "recipes/tiny/sft.yaml", "--load_in_4bit", "false", "--test_size", "4", "--max_steps", "2",
            "--save_steps", "1", "--report_to", "wandb", "--hub_token", TOKENS["hub_token"], "--output_dir", str(out),
            "--disable_tqdm", "true"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["recipes/sft.py", *argv])  # as a launch has it: W&B records the command line
    run_recipe("sft", argv)

    written = [p for folder in (out, wandb_dir) for p in folder.rglob("*") if p.is_file()]
    wandb_runs = [p for p in written if p.suffix == ".wandb"]
    assert wandb_runs and any(b"--hub_token" in p.read_bytes() for p in wandb_runs)  # the scan sees W&B's records
    assert (out / "checkpoint-1" / "optimizer.pt").is_file() and (out / "adapter_model.safetensors").is_file()
    for path in written:
        content = path.read_bytes()
        for name, token in TOKENS.items():
            assert token.encode() not in content, f"{name} written to {path}"
    console = capfd.readouterr()
    for name, token in TOKENS.items():
        assert token not in console.out + console.err, f"{name} printed"

    # safetensors only: no pickled arguments anywhere, no pickle weights next to the adapter
    assert not [p for p in written if p.name == "training_args.bin"]
    assert not [p.name for p in out.iterdir() if p.suffix in (".bin", ".pt", ".pth")]


def test_trust_remote_code_and_pickle_weights_are_off_by_default(tmp_path):
    (tmp_path / "r.yaml").write_text("model_name_or_path: tiny:llama\n")
    model_args = parse_recipe(SFTConfig, ["--config", str(tmp_path / "r.yaml")]).model
    assert model_args.trust_remote_code is False and model_args.allow_pickle_weights is False


def test_model_folder_code_never_runs_by_default(tmp_path, tiny_llama):
    """A model folder whose config points at its own Python code: loading it must not import that code."""
    folder, ran = tmp_path / "model_with_code", tmp_path / "code_ran"
    shutil.copytree(tiny_llama, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom.Config", "AutoModelForCausalLM": "custom.Model"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "custom.py").write_text(
        f"open({str(ran)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class Config(LlamaConfig): pass\n"
        "class Model(LlamaForCausalLM): pass\n"
    )
    model_args = parse_recipe(SFTConfig, ["--model_name_or_path", str(folder)]).model
    tokenizer = load_tokenizer(model_args)
    model = load_model(model_args, tokenizer=tokenizer)
    assert not ran.exists()
    assert type(model.get_base_model()).__module__.startswith("transformers.")
    assert not Path(folder, "__pycache__").exists()
