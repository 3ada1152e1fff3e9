"""The memory planner (alignkit/train/plan.py): its arithmetic against what the loaded tiny model, peft and AdamW
really hold; `alignkit plan` (table, exit 0; bad input, exit 2); and a stage refusing a run that cannot fit before
anything loads. Measured peak memory against the planner: benchmarks/plan_check.py (docs/planning.md)."""

import json
import math

import pytest
import torch

from alignkit.cli import main
from alignkit.train.plan import Arch, GiB, Setup, estimate, gpu_spec

TINY = "recipes/tiny/sft.yaml"


@pytest.fixture(scope="module")
def tiny_arch(tiny_llama):
    return Arch.from_config(json.loads((tiny_llama / "config.json").read_text()))


def _rows(plan) -> dict[str, int]:
    return {name: size for name, size, _ in plan.rows}


def test_parameter_count_is_the_loaded_models(tiny_llama, tiny_arch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    assert tiny_arch.params()["total"] == sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n)
    assert tiny_arch.params()["linear"] == linear
    plan = estimate(tiny_arch, Setup(use_peft=False, weights_dtype="float32"))
    assert _rows(plan)["weights"] == sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"], ["down_proj"]])
def test_lora_parameters_and_adamw_state_are_peft_and_torchs(tiny_llama, tiny_arch, targets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, target_modules=targets, task_type="CAUSAL_LM"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    plan = _rows(estimate(tiny_arch, Setup(lora_r=8, lora_targets=targets)))
    assert plan["LoRA adapter"] == sum(p.numel() * p.element_size() for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss.backward()
    assert plan["gradients"] == sum(p.grad.numel() * p.grad.element_size() for p in trainable)
    optimizer.step()
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for k, t in s.items() if k != "step")
    assert plan["optimizer state"] == state


def test_4bit_weights_are_what_bitsandbytes_packs(tiny_llama, tiny_arch):
    from alignkit.config import ModelArguments, QuantizationArguments
    from alignkit.models.loader import load_base_model

    model = load_base_model(
        ModelArguments(model_name_or_path=str(tiny_llama)), QuantizationArguments(load_in_4bit=True)
    )
    packed = sum(p.numel() * p.element_size() for p in model.parameters() if hasattr(p, "quant_state"))
    rest = sum(p.numel() * p.element_size() for p in model.parameters() if not hasattr(p, "quant_state"))
    params = tiny_arch.params()
    assert packed == params["linear"] // 2 and rest == params["other"] * 4
    absmax = sum(p.quant_state.absmax.numel() for p in model.parameters() if hasattr(p, "quant_state"))
    assert absmax == params["linear"] // 64  # one (double-quantized, uint8) absmax per 64 weights
    weights = _rows(estimate(tiny_arch, Setup(load_in_4bit=True)))["weights"]
    assert packed + rest < weights < packed + rest + params["linear"] / 32


def test_checkpointing_zero_and_4bit_move_the_totals_the_right_way(tiny_arch):
    base = Setup(batch=8, seq=512, device="H100", memory=80 * GiB, weights_dtype="bfloat16")
    plain = estimate(tiny_arch, base)
    assert estimate(tiny_arch, Setup(**{**base.__dict__, "checkpointing": True})).total < plain.total
    assert estimate(tiny_arch, Setup(**{**base.__dict__, "batch": 16})).total > plain.total
    full = Setup(**{**base.__dict__, "use_peft": False})
    zero3 = Setup(**{**full.__dict__, "num_processes": 8, "zero_stage": 3})
    total = tiny_arch.params()["total"]  # DeepSpeed: fp32 moments and master copy (12 B), split over the ranks
    assert _rows(estimate(tiny_arch, zero3))["optimizer state"] == total * 12 // 8
    assert _rows(estimate(tiny_arch, zero3))["weights"] < _rows(estimate(tiny_arch, full))["weights"]
    dpo = estimate(tiny_arch, Setup(**{**base.__dict__, "stage": "dpo"}))
    assert _rows(dpo)["activations"] > _rows(plain)["activations"] and "reference adapter" in _rows(dpo)


def test_gpu_names_and_sizes():
    assert gpu_spec("h100")[0] == "H100" and gpu_spec("A100-80GB")[1] == 80 * GiB
    assert gpu_spec("24GB")[1] == 24 * GiB
    with pytest.raises(ValueError, match="unknown"):
        gpu_spec("toaster")


def test_plan_command_prints_the_table(capsys):
    assert main(["plan", "--config", TINY]) == 0
    out = capsys.readouterr().out
    assert "memory plan (sft, per rank)" in out and "activations" in out and "fits: yes" in out
    assert main(["plan", "--config", "recipes/gpu/sft_llama31_8b_qlora_24gb.yaml", "--gpu", "24GB"]) == 0
    out = capsys.readouterr().out
    assert "8.03B params" in out and "fits: yes" in out and "tokens/s" in out
    assert main(["plan", "--config", "recipes/gpu/sft_llama31_8b_lora_80gb.yaml", "--gpu", "24GB"]) == 0
    out = capsys.readouterr().out
    assert "fits: NO" in out and "load_in_4bit: true" in out  # says what to change


def test_plan_command_refuses_bad_input(capsys, tmp_path):
    assert main(["plan", "--config", str(tmp_path / "none.yaml")]) == 2
    assert main(["plan", "--config", TINY, "--gpu", "toaster"]) == 2
    assert "--gpu toaster: unknown" in capsys.readouterr().err
    assert main(["plan", "--config", TINY, "--model_name_or_path", "nosuch-org/nosuch-model"]) == 2
    assert "--model_config" in capsys.readouterr().err  # a Hub id not cached: it says what to pass


def test_a_run_that_cannot_fit_is_refused_before_loading(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["sft", "--config", TINY, "--per_device_train_batch_size", "200000", "--max_length", "512",
            "--output_dir", str(out)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "memory plan" in err and "Fix:" in err and "per_device_train_batch_size" in err
    assert not out.exists() or not any(out.iterdir())


def test_init_with_gpus_writes_the_accelerate_config_the_plan_picks(tmp_path, capsys):
    import yaml

    small = tmp_path / "small" / "sft.yaml"
    assert main(["init", "sft", "--model", "tiny:llama", "--out", str(small), "--gpus", "2"]) == 0
    ddp = yaml.safe_load((small.parent / "accelerate_ddp.yaml").read_text())
    assert ddp["distributed_type"] == "MULTI_GPU" and ddp["num_processes"] == 2
    big = tmp_path / "big" / "sft.yaml"
    argv = ["init", "sft", "--model", "meta-llama/Llama-3.1-70B-Instruct", "--out", str(big), "--gpus", "8",
            "--gpu", "24GB"]  # fmt: skip
    assert main(argv) == 0
    zero3 = yaml.safe_load((big.parent / "accelerate_zero3.yaml").read_text())
    assert zero3["num_processes"] == 8 and zero3["deepspeed_config"]["deepspeed_config_file"] == "zero3.json"
    assert json.loads((big.parent / "zero3.json").read_text())["zero_optimization"]["stage"] == 3
    assert "ZeRO-3 over 8" in capsys.readouterr().out


def test_a_model_not_here_is_planned_from_its_config(tiny_llama, tmp_path, capsys):
    later = ["--model_name_or_path", str(tmp_path / "sft_output_not_yet_trained")]
    assert main(["plan", "--config", "recipes/tiny/dpo.yaml", *later]) == 2
    assert "--model_config" in capsys.readouterr().err
    assert main(["plan", "--config", "recipes/tiny/dpo.yaml", *later, "--model_config", str(tiny_llama)]) == 0
    assert "memory plan (dpo, per rank)" in capsys.readouterr().out


def test_a_run_records_its_plan(tmp_path):
    from alignkit.runs import RunRecord

    out = tmp_path / "run"
    argv = [
        "sft",
        "--config",
        TINY,
        "--max_steps",
        "1",
        "--test_size",
        "0",
        "--save_steps",
        "10",
        "--output_dir",
        str(out),
    ]
    assert main(argv) == 0
    plan = RunRecord.read(out).lineage[-1].memory_plan
    assert plan["device"] == "cpu" and plan["fits"] is True and 300 < plan["predicted_peak_mib"] < 2000
    assert set(plan["parts_mib"]) >= {"weights", "activations", "optimizer state"}


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_parameter_count_is_the_checkpoints(kind):
    """Llama (untied head, GQA) and Gemma 3 (tied head, four norms and q/k norms per layer, one kv head)."""
    from safetensors import safe_open

    from alignkit.testing import tiny_model_path

    folder = tiny_model_path(kind)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        stored = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert Arch.from_config(json.loads((folder / "config.json").read_text())).params()["total"] == stored


def test_the_written_zero3_config_launches_with_its_own_json(tmp_path):
    from alignkit.scaffold import launch_command, write_launch_config, write_recipe

    recipe = write_recipe("sft", tmp_path / "sft.yaml", model="meta-llama/Llama-3.1-70B-Instruct")[0]
    config = write_launch_config("sft", recipe, 8, "24GB")[0][0]
    command = launch_command("sft", ["--config", str(recipe), "--accelerate_config", str(config)])
    import yaml

    launched = yaml.safe_load(open(command[command.index("--config_file") + 1]))
    assert launched["deepspeed_config"]["deepspeed_config_file"] == str(tmp_path / "zero3.json")
