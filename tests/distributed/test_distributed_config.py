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
from alignkit.errors import ConfigError
from alignkit.models.loader import get_quantization_config
from alignkit.runtime import fit_backend_to_device

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

    kinds = {"ddp": "MULTI_GPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED", "zero3_offload": "DEEPSPEED"}
    for name, kind in kinds.items():
        path = REPO / "accelerate_configs" / f"{name}.yaml"
        config = ClusterConfig.from_yaml_file(str(path))
        assert config.distributed_type == kind, name
        ds_file = (yaml.safe_load(path.read_text()).get("deepspeed_config") or {}).get("deepspeed_config_file")
        if ds_file:
            zero = json.loads((REPO / ds_file).read_text())["zero_optimization"]
            assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
            assert ("offload_param" in zero) == (name == "zero3_offload")


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
