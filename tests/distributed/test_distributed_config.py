"""What alignkit decides about a multi-process launch before any rank loads a model: the CPU backend, the 4-bit
storage dtype under ZeRO-3/FSDP, and the combinations that would break, each refused with the fix."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import REPO

from alignkit.config import SFTConfig, parse_recipe, validate
from alignkit.config.trainers import fit_backend_to_device
from alignkit.errors import ConfigError
from alignkit.models.loader import get_quantization_config

LAUNCH_ENV = {  # what `accelerate launch --config_file accelerate_configs/<x>.yaml` puts in each rank's environment
    "zero3": {
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_CONFIG_FILE": "accelerate_configs/deepspeed/zero3.json",
    },
    "zero2": {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"},
    "fsdp": {"ACCELERATE_USE_FSDP": "true"},
    "ddp": {"WORLD_SIZE": "2"},
}


def _recipe(*argv):
    return parse_recipe(SFTConfig, ["--config", "recipes/tiny/sft.yaml", "--output_dir", "/tmp/unused", *argv])


def _launched(monkeypatch, kind):
    for key, value in LAUNCH_ENV[kind].items():
        monkeypatch.setenv(key, value)


def test_shipped_configs_are_valid_accelerate_configs():
    from accelerate.commands.config.config_args import ClusterConfig

    kinds = {"ddp": "MULTI_GPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED", "zero3_offload": "DEEPSPEED",
             "multinode_zero3": "DEEPSPEED"}  # fmt: skip
    for name, kind in kinds.items():
        path = REPO / "accelerate_configs" / f"{name}.yaml"
        config = ClusterConfig.from_yaml_file(str(path))
        assert config.distributed_type == kind, name
        ds_file = (yaml.safe_load(path.read_text()).get("deepspeed_config") or {}).get("deepspeed_config_file")
        if ds_file:
            zero = json.loads((REPO / ds_file).read_text())["zero_optimization"]
            assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
            assert ("offload_param" in zero) == (name == "zero3_offload")


def test_cluster_launch_examples_parse():
    """The multi-node files a user edits: the accelerate config loads with accelerate's own loader (accelerate's
    `standard` multi-node launcher, one launch per node), the DeepSpeed hostfile with DeepSpeed's own parser, and the
    SLURM script passes `bash -n` and passes SLURM's node id and first host to accelerate launch (it runs, with
    srun/scontrol standing in, in tests/distributed/test_multinode.py)."""
    import subprocess

    from accelerate.commands.config.config_args import ClusterConfig
    from deepspeed.launcher.runner import fetch_hostfile

    config = ClusterConfig.from_yaml_file(str(REPO / "accelerate_configs/multinode_zero3.yaml"))
    assert config.distributed_type == "DEEPSPEED" and config.num_machines == 2
    assert config.deepspeed_config["deepspeed_multinode_launcher"] == "standard"
    assert (REPO / config.deepspeed_config["deepspeed_config_file"]).is_file()
    assert fetch_hostfile(str(REPO / "accelerate_configs/deepspeed/hostfile")) == {"node-1": 8, "node-2": 8}
    sbatch = REPO / "scripts/slurm/multinode_zero3.sbatch"
    done = subprocess.run(["bash", "-n", str(sbatch)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = sbatch.read_text()
    for needed in (
        '--machine_rank "$SLURM_NODEID"',
        "scontrol show hostnames",
        "accelerate_configs/multinode_zero3.yaml",
    ):
        assert needed in text


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, {"ddp_backend": None, "use_cpu": False}),  # one process: nothing to decide
        ({"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true"}, {"ddp_backend": "gloo", "use_cpu": False}),
        ({"WORLD_SIZE": "2"}, {"ddp_backend": None, "use_cpu": True}),  # DDP: accelerate's MULTI_CPU path
    ],
)
def test_multi_process_launch_without_gpu_gets_a_cpu_backend(monkeypatch, env, expected):
    for key in ("WORLD_SIZE", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = SimpleNamespace(ddp_backend=None, use_cpu=False, deepspeed=None)
    fit_backend_to_device(args)
    assert vars(args) == {**expected, "deepspeed": None}


@pytest.mark.parametrize("kind", ["zero3", "fsdp"])
def test_4bit_storage_follows_the_compute_dtype_when_parameters_are_split(monkeypatch, kind):
    recipe = _recipe()  # load_in_4bit, storage unset
    _launched(monkeypatch, kind)
    validate(recipe)
    assert get_quantization_config(recipe.quant).bnb_4bit_quant_storage == torch.float32  # fp32 compute on CPU
    recipe.quant.bnb_4bit_quant_storage = "uint8"
    with pytest.raises(ConfigError, match=r"bnb_4bit_quant_storage uint8.*Fix: set bnb_4bit_quant_storage: float32"):
        validate(recipe)


def test_4bit_storage_stays_packed_when_parameters_are_not_split(monkeypatch):
    recipe = _recipe("--bnb_4bit_quant_storage", "uint8")
    _launched(monkeypatch, "zero2")
    validate(recipe)
    assert get_quantization_config(recipe.quant).bnb_4bit_quant_storage == torch.uint8


def test_auto_find_batch_size_under_zero3_is_refused(monkeypatch):
    recipe = _recipe("--auto_find_batch_size", "true")
    _launched(monkeypatch, "zero3")
    with pytest.raises(ConfigError, match="auto_find_batch_size under ZeRO-3.*Fix"):
        validate(recipe)


def test_reentrant_checkpointing_with_an_adapter_under_ddp_is_refused(monkeypatch):
    recipe = _recipe("--gradient_checkpointing", "true", "--gradient_checkpointing_kwargs", "{use_reentrant: true}")
    validate(recipe)  # one process: fine
    _launched(monkeypatch, "ddp")
    with pytest.raises(ConfigError, match="use_reentrant: true under DDP.*Fix"):
        validate(recipe)
    recipe.train.ddp_find_unused_parameters = False
    validate(recipe)


def test_debug_log_hashes_rows_alike_padded_or_padding_free():
    from alignkit.train.distributed import _row_hashes

    padded = _row_hashes(torch.tensor([[5, 6, 7], [8, 9, 0]]), attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]))
    free = _row_hashes(torch.tensor([[5, 6, 7, 8, 9]]), position_ids=torch.tensor([[0, 1, 2, 0, 1]]))
    assert padded == free and len(set(free)) == 2


def test_world_size_of_a_checkpoint_without_alignkit_s_record_comes_from_deepspeed_s_file_names(tmp_path):
    """Checkpoints saved before alignkit recorded the launch in alignkit_checkpoint.json: the world size is the number
    of ZeRO optimizer shards (one per data-parallel rank, DeepSpeed's file names; nothing is unpickled)."""
    from alignkit.train.resume import checkpoint_launch

    tag = tmp_path / "checkpoint-2" / "global_step2"
    tag.mkdir(parents=True)
    (tmp_path / "checkpoint-2" / "alignkit_checkpoint.json").write_text(json.dumps({"step": 2, "files": {}}))
    for rank in range(3):
        (tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"")
    (tag / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"")
    assert checkpoint_launch(tmp_path / "checkpoint-2") == (3, None)
    assert checkpoint_launch(tmp_path) == (None, None)  # not a DeepSpeed checkpoint: unknown, nothing refused
