"""Pushing: a recipe with push_to_hub checks token and repo before training, then uploads exactly the card, adapter
weights and config, tokenizer, chat template and alignkit's metadata, and never writes or prints the token."""

from pathlib import Path

import pytest
from conftest import run_recipe

from alignkit.cli import main as cli
from alignkit.errors import PreflightError
from alignkit.export.hub import files_to_push

from .conftest import HUB_TOKEN, HubRecorder

ADAPTER_FILES = [
    "README.md", "adapter_config.json", "adapter_model.safetensors", "alignkit_config.yaml", "alignkit_run.json",
    "chat_template.jinja", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "trainer_state.json",
]  # fmt: skip


def test_recipe_push_uploads_exactly_the_adapter_files(sft_fp):
    hub, out = sft_fp.hub, sft_fp.output_dir
    # Before training: token accepted, repo created private in the user's namespace, write access checked.
    names = [name for name, _ in hub.calls]
    assert names.index("auth_check") < names.index("upload_folder") == len(names) - 1
    assert hub.named("create_repo")[0] == {"repo_id": "alice/tiny-sft", "private": True, "exist_ok": True}
    assert hub.named("auth_check") == [{"repo_id": "alice/tiny-sft", "write": True}]
    (upload,) = hub.named("upload_folder")  # once, after saving: the Trainer's own checkpoint pushes are off
    assert upload["repo_id"] == "alice/tiny-sft"
    assert all(
        upload["uploaded"][n] == (out / n).read_bytes() for n in upload["uploaded"] if n.endswith(".safetensors")
    )
    assert sorted(upload["allow_patterns"]) == ADAPTER_FILES
    assert all((out / name).is_file() for name in ADAPTER_FILES)
    leaked = [p for p in out.rglob("*") if p.is_file() and HUB_TOKEN.encode() in p.read_bytes()]
    assert not leaked


def test_no_token_stops_before_the_first_training_step(tmp_path, monkeypatch):
    hub = HubRecorder().install(monkeypatch)
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(
        "huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-token")
    )  # no `hf auth login` file
    out = tmp_path / "run"
    with pytest.raises(PreflightError, match="push_to_hub") as err:
        run_recipe("sft", ["--config", "recipes/tiny/sft.yaml", "--output_dir", str(out), "--push_to_hub", "true"])
    assert "token" in str(err.value) and "HF_TOKEN" in str(err.value) and not hub.calls
    assert not (out / "alignkit_run.json").exists() and not list(out.glob("checkpoint-*"))  # training never started


def test_rejected_token_is_never_quoted(tmp_path, monkeypatch, capfd):
    HubRecorder().install(monkeypatch)

    def refuse(*args, **kwargs):
        raise RuntimeError(f"401 Unauthorized for token {HUB_TOKEN}")

    monkeypatch.setattr("huggingface_hub.HfApi.whoami", refuse)
    with pytest.raises(PreflightError) as err:
        run_recipe(
            "sft", ["--config", "recipes/tiny/sft.yaml", "--output_dir", str(tmp_path / "run"), "--push_to_hub", "true"]
        )
    captured = capfd.readouterr()
    assert HUB_TOKEN not in str(err.value) + captured.out + captured.err


def test_push_refuses_folders_without_card_or_weights(sft_fp, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("adapter_config.json", "tokenizer.json"):
        (partial / name).write_bytes((Path(sft_fp.output_dir) / name).read_bytes())
    with pytest.raises(PreflightError, match=r"README.md \(model card\), \*.safetensors weights"):
        files_to_push(partial)


def test_push_command_uploads_a_dpo_adapter_without_its_reference_copy_or_checkpoints(chain, monkeypatch):
    hub = HubRecorder().install(monkeypatch)
    assert (chain.dpo / "ref").is_dir() and list(chain.dpo.glob("checkpoint-*"))  # trl's frozen reference, a checkpoint
    assert cli(["push", str(chain.dpo), "--hub_model_id", "org/tiny-dpo"]) == 0
    (upload,) = hub.named("upload_folder")
    assert upload["repo_id"] == "org/tiny-dpo" and sorted(upload["allow_patterns"]) == ADAPTER_FILES


def test_nothing_pushed_names_a_path_of_this_machine(chain, monkeypatch, tmp_path):
    """Issue 21: the card, alignkit_run.json, alignkit_config.yaml (and transformers' metadata) that push uploads
    carry no absolute local path; the card names datasets by file name with rows and sha256, stages by run name.
    Checked on the DPO end of the CPT -> SFT -> DPO chain and on its merged model."""
    from alignkit.export.merge import merge_adapter
    from alignkit.export.portable import local_paths

    hub = HubRecorder().install(monkeypatch)
    merged = merge_adapter(chain.dpo, tmp_path / "merged").output_dir
    for folder in (chain.dpo, merged):
        hub.calls.clear()
        assert cli(["push", str(folder), "--hub_model_id", "org/tiny"]) == 0
        (upload,) = hub.named("upload_folder")
        texts = {n: b.decode() for n, b in upload["uploaded"].items() if not n.endswith(".safetensors")}
        assert {"README.md", "alignkit_run.json"} <= set(texts) and (
            "alignkit_config.yaml" in texts or folder == merged
        )
        for name, text in texts.items():
            if name.startswith("tokenizer"):
                continue
            leaked = local_paths(text)
            assert not leaked and str(tmp_path) not in text and str(chain.dpo.parent) not in text, (name, leaked)
        card = texts["README.md"]
        assert "`dpo.jsonl` (x1.0, " in card and " rows, sha256 " in card, card
    # the local files keep their paths: the next stage on this machine reads them
    assert str(chain.dpo) in (chain.dpo / "alignkit_run.json").read_text()
