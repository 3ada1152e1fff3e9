"""Finished tiny runs shared by the export tests (built once per session, a few steps each):

- ``chain``: CPT -> SFT -> DPO on 4-bit QLoRA, each stage continuing the previous adapter; SFT and DPO log to an
  offline W&B dir.
- ``sft_fp``: SFT on the full-precision tiny Llama that pushes to the Hub at the end (HfApi's network methods are
  replaced by recorders, nothing else).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO, run_recipe

HUB_TOKEN = "hf_alignkitTestTokenNeverWritten0123"
FAST = ["--max_steps", "3", "--save_steps", "100", "--logging_steps", "1", "--disable_tqdm", "true",
        "--overwrite_output_dir", "true"]  # fmt: skip


@dataclass
class HubRecorder:
    """Stands in for the Hub's HTTP endpoints: records what HfApi would send."""

    calls: list[tuple[str, dict]] = field(default_factory=list)

    def install(self, mp: pytest.MonkeyPatch) -> HubRecorder:
        from huggingface_hub import HfApi, RepoUrl

        def whoami(*args, **kwargs):
            self.calls.append(("whoami", {}))
            return {"name": "alice", "auth": {"accessToken": {"role": "write"}}}

        def create_repo(api, repo_id, **kwargs):
            self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def auth_check(api, repo_id, **kwargs):
            self.calls.append(("auth_check", {"repo_id": repo_id, **kwargs}))

        def upload_folder(api, **kwargs):
            # what would leave the machine: the allowed files' bytes, read while the staged folder exists
            folder = Path(kwargs["folder_path"])
            kwargs["uploaded"] = {name: (folder / name).read_bytes() for name in kwargs["allow_patterns"]}
            self.calls.append(("upload_folder", kwargs))

        for name, fake in (
            ("whoami", whoami),
            ("create_repo", create_repo),
            ("auth_check", auth_check),
            ("upload_folder", upload_folder),
        ):
            mp.setattr(HfApi, name, fake)
        mp.setenv("HF_TOKEN", HUB_TOKEN)
        return self

    def named(self, name: str) -> list[dict]:
        return [kw for n, kw in self.calls if n == name]


@dataclass
class Chain:
    cpt: Path
    sft: Path
    dpo: Path
    wandb_dir: Path


@pytest.fixture(scope="session")
def chain(tmp_path_factory) -> Chain:
    root = tmp_path_factory.mktemp("chain")
    wandb_dir = root / "wandb"
    wandb_dir.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        mp.setenv("WANDB_DIR", str(wandb_dir))
        mp.setenv("WANDB_MODE", "offline")
        run_recipe("cpt", ["--config", "recipes/tiny/cpt.yaml", "--output_dir", str(root / "cpt"), *FAST])
        wandb = ["--report_to", "wandb"]
        run_recipe("sft", ["--config", "recipes/tiny/sft.yaml", "--model_name_or_path", str(root / "cpt"), "--test_size", "4",
                           "--output_dir", str(root / "sft"), *FAST, *wandb])  # fmt: skip
        run_recipe("dpo", ["--config", "recipes/tiny/dpo.yaml", "--model_name_or_path", str(root / "sft"), "--test_size", "4",
                           "--output_dir", str(root / "dpo"), *FAST, *wandb])  # fmt: skip
    return Chain(cpt=root / "cpt", sft=root / "sft", dpo=root / "dpo", wandb_dir=wandb_dir)


@dataclass
class PushedRun:
    output_dir: Path
    hub: HubRecorder


@pytest.fixture(scope="session")
def sft_fp(tmp_path_factory) -> PushedRun:
    out = tmp_path_factory.mktemp("sft_fp") / "tiny-sft"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        hub = HubRecorder().install(mp)
        run_recipe("sft", ["--config", "recipes/tiny/sft.yaml", "--load_in_4bit", "false", "--learning_rate", "2e-2",
                           "--test_size", "4", "--output_dir", str(out), *FAST,
                           "--push_to_hub", "true", "--hub_private_repo", "true"])  # fmt: skip
    return PushedRun(output_dir=out, hub=hub)
