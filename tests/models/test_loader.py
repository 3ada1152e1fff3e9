"""The one loader: every task loads full precision and 4-bit, forward passes are finite, only adapters and new
heads train."""

import pytest
import torch

from alignkit.config import AdapterArguments, ModelArguments, QuantizationArguments
from alignkit.errors import ConfigError, PreflightError
from alignkit.models import get_quantization_config, load_model

TASKS = [
    ("causal_lm", "tiny:llama", {}),
    ("seq_cls", "tiny:llama", {"num_labels": 3}),
    ("token_cls", "tiny:bert", {"num_labels": 5}),
    ("qa", "tiny:bert", {}),
    ("mlm", "tiny:bert", {}),
    ("seq2seq", "tiny:bart", {}),
]
HEADS = {"seq_cls": "score", "token_cls": "classifier", "qa": "qa_outputs"}


@pytest.mark.parametrize("four_bit", [False, True], ids=["full", "4bit"])
@pytest.mark.parametrize("task,name,head_kwargs", TASKS, ids=[t[0] for t in TASKS])
def test_every_task_loads_through_the_one_loader(task, name, head_kwargs, four_bit):
    import bitsandbytes as bnb

    model = load_model(
        ModelArguments(model_name_or_path=name),
        QuantizationArguments(load_in_4bit=four_bit),
        AdapterArguments(lora_r=4),
        task,
        **head_kwargs,
    )
    linear4 = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    if four_bit:
        assert linear4, "4-bit load produced no bitsandbytes Linear4bit layers"
        base_linears = [
            n
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)
            and "lora_" not in n
            and "modules_to_save" not in n
            and "original_module" not in n
            and not any(h in n for h in ("lm_head", "score", "classifier", "qa_outputs", "cls."))
        ]
        assert set(base_linears) <= set(linear4), f"unquantized backbone linears: {set(base_linears) - set(linear4)}"
    else:
        assert not linear4

    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    head = HEADS.get(task)
    for n in trainable:
        assert "lora_" in n or (head and f"{head}.modules_to_save" in n), f"{n} should be frozen"
    if head:
        assert any(f"{head}.modules_to_save" in n for n in trainable), "the new task head must be trainable"

    ids = torch.randint(5, 200, (2, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if task == "seq2seq":
        batch["decoder_input_ids"] = ids[:, :6]
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    key = "start_logits" if task == "qa" else "logits"
    assert torch.isfinite(out[key]).all()


def test_head_stays_out_of_4bit():
    config = get_quantization_config(QuantizationArguments(load_in_4bit=True), "token_cls")
    assert {"classifier", "lm_head"} <= set(config.llm_int8_skip_modules)
    assert config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant


def test_full_finetuning_trains_everything():
    model = load_model(ModelArguments(model_name_or_path="tiny:llama"), adapter_args=AdapterArguments(use_peft=False))
    assert all(p.requires_grad for p in model.parameters())


def test_dora_and_rslora_reach_peft():
    model = load_model(
        ModelArguments(model_name_or_path="tiny:llama"),
        adapter_args=AdapterArguments(lora_r=4, use_dora=True, use_rslora=True),
    )
    config = model.peft_config["default"]
    assert config.use_dora and config.use_rslora
    assert any("lora_magnitude_vector" in n for n, _ in model.named_parameters())


def test_unknown_target_module_is_a_clear_error():
    with pytest.raises(ConfigError, match="not found in the model. Fix"):
        load_model(
            ModelArguments(model_name_or_path="tiny:llama"),
            adapter_args=AdapterArguments(lora_target_modules=["q_proj", "qkv"]),
        )


def test_unknown_module_to_save_is_a_clear_error():
    """peft skips a modules_to_save name that matches nothing: lm_headd trained and saved no head, silently."""
    with pytest.raises(ConfigError, match=r"lora_modules_to_save: \['lm_headd'\] not found.*Did you mean 'lm_head'"):
        load_model(
            ModelArguments(model_name_or_path="tiny:llama"),
            adapter_args=AdapterArguments(lora_r=4, lora_modules_to_save=["lm_headd"]),
        )
    model = load_model(
        ModelArguments(model_name_or_path="tiny:llama"),
        adapter_args=AdapterArguments(lora_r=4, lora_modules_to_save=["lm_head"]),
    )
    assert model.peft_config["default"].modules_to_save == ["lm_head"]


def test_pickle_only_weights_are_refused(tmp_path, tiny_llama):
    import shutil

    from safetensors.torch import load_file

    for f in tiny_llama.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, tmp_path / f.name)
    torch.save(load_file(tiny_llama / "model.safetensors"), tmp_path / "pytorch_model.bin")
    with pytest.raises(PreflightError, match="allow_pickle_weights"):
        load_model(ModelArguments(model_name_or_path=str(tmp_path)))


def test_unknown_tiny_model():
    with pytest.raises(ConfigError, match="tiny:llama"):
        load_model(ModelArguments(model_name_or_path="tiny:gpt9"))


@pytest.mark.parametrize("name", ["outputs/tiny/never_trained", "./missing_model", "/no/such/dir"])
def test_a_missing_local_model_path_is_named_with_a_fix(name):
    """Not a Hub id either (those are 'namespace/name'): the error names the path, not the Hub client's repo-id rule."""
    with pytest.raises(ConfigError, match=f"'{name}' does not exist. Fix: .*run that stage first"):
        load_model(ModelArguments(model_name_or_path=name))
