"""DPO stage: recipes/dpo.py on the tiny Llama. A learnable preference is learned on held-out pairs; the reference
is the initial policy computed from the one backbone (no second model); every SFT -> DPO hand-off trains what it
says, against the SFT model as reference, and saves an output that reloads as trained; beta and loss_type reach
trl; bad preference rows fail before training; `accelerate launch` runs the tiny recipe."""

import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch
from conftest import REPO, log_history, run_recipe, write_jsonl
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from alignkit.config import AdapterArguments, ModelArguments, QuantizationArguments
from alignkit.errors import ConfigError, DataError
from alignkit.models import load_model, resolve_source
from alignkit.train import runner

FAST = ["--disable_tqdm", "true", "--save_steps", "1000", "--gradient_checkpointing", "false", "--lora_dropout", "0"]
# The tiny recipe's chat preference data, from an SFT output: one step is enough to check what each hand-off trains.
HANDOFF = ["--config", "recipes/tiny/dpo.yaml", *"--test_size 0 --max_train_samples 8 --max_steps 1".split(), *FAST]
WORDS = "the a of to in and is for model data user city paris london alice bob cat dog bird red green blue".split()


@pytest.fixture(scope="module")
def capture():
    """The trainers the recipe hands to the run loop (the real ones; the run loop still trains them)."""
    seen, real_train = [], runner.Run.train

    def train(self, trainer, **kwargs):
        seen.append(trainer)
        return real_train(self, trainer, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner.Run, "train", train)
        yield seen


@pytest.fixture(scope="module")
def sft_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    run_recipe("sft", ["--config", "recipes/tiny/sft.yaml", "--load_in_4bit", "false", "--test_size", "0", "--max_steps", "2",
                       "--output_dir", str(out), *FAST])  # fmt: skip
    return out


def _preference_rows(n, seed):
    """The same random continuation, then a fixed good ending (chosen) or a fixed bad one (rejected)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 6)))
        body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4)))
        rows.append({"prompt": prompt, "chosen": f" {body} good great happy", "rejected": f" {body} bad terrible sad"})
    return rows


@pytest.fixture(scope="module")
def learned(tmp_path_factory, capture):
    """A fresh LoRA on the tiny base (no hand-off) trained on a learnable preference, evaluated at step 0 and at the
    end on 16 held-out pairs."""
    tmp = tmp_path_factory.mktemp("learned")
    data = write_jsonl(tmp / "pref.jsonl", _preference_rows(56, seed=0))
    argv = ["--model_name_or_path", "tiny:llama", "--load_in_4bit", "false", "--lora_r", "8", "--lora_alpha", "16",
            "--datasets", str(data), "--test_size", "16", "--max_length", "64", "--learning_rate", "1e-2",
            "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16", "--max_steps", "6",
            "--lr_scheduler_type", "constant", "--beta", "0.1", "--eval_strategy", "steps", "--eval_steps", "6",
            "--eval_on_start", "true", "--output_dir", str(tmp / "out"), "--seed", "0", *FAST]  # fmt: skip
    run_recipe("dpo", argv)
    return capture[-1], tmp / "out"


def test_learnable_preference_is_learned_on_held_out_pairs(learned):
    trainer, out = learned
    evals = [e for e in log_history(out) if "eval_rewards/accuracies" in e]
    start, end = evals[0], evals[-1]
    assert start["step"] == 0 and start["eval_rewards/margins"] == pytest.approx(0, abs=1e-6)  # policy == reference
    assert end["eval_rewards/accuracies"] >= 0.9, end  # chance is 0.5
    assert end["eval_rewards/margins"] > 0.5 > start["eval_rewards/margins"], (start, end)
    assert end["eval_loss"] < math.log(2) - 0.2, end
    # beta and loss_type of the recipe (sigmoid at 0.1: the step-0 loss is -log sigmoid(0) = ln 2)
    assert trainer.beta == 0.1 and trainer.loss_types == ["sigmoid"]
    assert log_history(out)[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)


def _base_param_numel(path):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def _sequence_logps(model, batch):
    """Summed completion log-probs of [chosen; rejected], computed independently of trl."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    token_logps = torch.log_softmax(logits, -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return (token_logps * batch["completion_mask"][:, 1:]).sum(1)


def _reference_logps(trainer, batch):
    chosen, rejected = trainer.compute_ref_log_probs(trainer.model, batch)  # trl's own reference pass
    return torch.cat([chosen, rejected])


def test_reference_is_the_adapter_disabled_backbone_without_a_second_model(learned, tiny_llama):
    trainer, _ = learned
    assert trainer.ref_model is None
    # Every parameter tensor reachable from the trainer, by storage: the backbone's weights exist once.
    reachable = [trainer.model, trainer.model_wrapped, *trainer.accelerator._models]
    params = {p.data_ptr(): (n, p) for m in reachable for n, p in m.named_parameters()}
    backbone = sum(p.numel() for n, p in params.values() if "lora_" not in n)
    adapters = {name: sum(p.numel() for n, p in params.values() if f".{name}." in n) for name in ("default", "ref")}
    assert backbone == _base_param_numel(tiny_llama), "a second copy of the backbone is alive"
    # trl's frozen 'ref' copy of the fresh adapter added nothing (lora_B zero): the zero_ref_adapter speed-up deleted it
    assert adapters["default"] > 0 and adapters["ref"] == 0
    batch = next(iter(trainer.get_eval_dataloader()))
    model = trainer.model.eval()
    with model.disable_adapter():
        backbone_logps = _sequence_logps(model, batch)
    assert torch.allclose(_reference_logps(trainer, batch), backbone_logps, atol=1e-4)
    assert not torch.allclose(_sequence_logps(model, batch), backbone_logps, atol=1e-2)  # the policy moved: can fail


@pytest.mark.parametrize(("loss_type", "beta", "step0_loss"), [("ipo", 0.25, 4.0), ("hinge", 0.1, 1.0)])
def test_loss_type_and_beta_reach_the_trainer(loss_type, beta, step0_loss, capture, tmp_path):
    """At step 0 policy == reference, so the loss is the loss function at 0: ipo (1/(2 beta))^2, hinge 1."""
    data = write_jsonl(tmp_path / "pref.jsonl", _preference_rows(4, seed=1))
    argv = ["--model_name_or_path", "tiny:llama", "--load_in_4bit", "false", "--datasets", str(data),
            "--test_size", "0", "--max_length", "64", "--max_steps", "1", "--per_device_train_batch_size", "4",
            "--loss_type", loss_type, "--beta", str(beta), "--output_dir", str(tmp_path / "out"), *FAST]  # fmt: skip
    run_recipe("dpo", argv)
    trainer = capture[-1]
    assert trainer.loss_types == [loss_type] and trainer.beta == beta
    assert log_history(tmp_path / "out")[0]["loss"] == pytest.approx(step0_loss, rel=1e-4)


def _sft_model(tiny_llama, sft_out, quantized=False):
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                               bnb_4bit_use_double_quant=True) if quantized else None  # fmt: skip
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32, quantization_config=quant)
    return PeftModel.from_pretrained(base, sft_out).eval()


def _reload(out):
    args = ModelArguments(model_name_or_path=str(out))
    return load_model(args, QuantizationArguments(), AdapterArguments(lora_dropout=0.0)).eval()


def _lineage_entry(out, sft_out, mode):
    meta = json.loads((out / "alignkit_run.json").read_text())
    assert [e["stage"] for e in meta["lineage"]] == ["sft", "dpo"] and meta["status"] == "finished"
    entry = meta["lineage"][-1]
    assert entry["adapter_handoff"] == mode and entry["from_adapter"] == str(sft_out) and entry["from_stage"] == "sft"
    card = (out / "README.md").read_text()
    assert "| sft |" in card and "| dpo |" in card and f"| {mode} |" in card
    return meta


@pytest.mark.parametrize("mode", ["continue", "reference", "merge"])
def test_handoff_trains_against_the_sft_model_and_reloads_as_trained(mode, sft_out, tiny_llama, capture, tmp_path):
    out = tmp_path / "dpo"
    run_recipe("dpo", [*HANDOFF, "--model_name_or_path", str(sft_out), "--adapter_handoff", mode, "--load_in_4bit", "false",
                       "--output_dir", str(out)])  # fmt: skip
    trainer, meta = capture[-1], _lineage_entry(out, sft_out, mode)
    first = log_history(out)[0]  # step 0: the policy is the reference
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-5)
    assert first["rewards/margins"] == pytest.approx(0, abs=1e-5)
    batch = next(iter(trainer.get_train_dataloader()))
    sft_logps = _sequence_logps(_sft_model(tiny_llama, sft_out), batch)
    assert torch.allclose(_reference_logps(trainer, batch), sft_logps, atol=1e-3), "the reference is not the SFT model"
    policy = trainer.model.eval()
    trained = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trained and all(".default." in n for n in trained)
    sft_weights = load_file(sft_out / "adapter_model.safetensors")
    if mode == "continue":  # the SFT adapter itself is trained; trl keeps a frozen copy of it as the reference
        ref = {n.replace(".ref.", "."): p for n, p in policy.named_parameters() if ".ref." in n}
        assert set(ref) == set(sft_weights) and all(torch.equal(ref[k], v) for k, v in sft_weights.items())
    else:  # a new adapter on the SFT model: trl's 'ref' copy of it (LoRA B = 0) added nothing, and zero_ref_adapter
        # deleted it, so the reference pass runs with adapters disabled, i.e. the SFT model itself (checked above)
        assert "ref" not in policy.peft_config and not any(".ref." in n for n, _ in policy.named_parameters())
    if mode == "reference":
        assert resolve_source(ModelArguments(model_name_or_path=str(out))).fold_adapters == [str(sft_out)]
    if mode == "merge":
        (merged,) = sft_out.glob("merged_base-*")
        assert meta["base_model_args"]["model_name_or_path"] == str(merged)
    assert torch.allclose(_sequence_logps(_reload(out), batch), _sequence_logps(policy, batch), atol=1e-3)
    assert not torch.allclose(_sequence_logps(policy, batch), sft_logps, atol=1e-3)  # DPO moved the policy


@pytest.mark.parametrize("mode", ["continue", "merge"])
def test_handoff_on_a_4bit_backbone(mode, sft_out, tiny_llama, capture, tmp_path):
    out = tmp_path / "dpo"
    run_recipe(
        "dpo", [*HANDOFF, "--model_name_or_path", str(sft_out), "--adapter_handoff", mode, "--output_dir", str(out)]
    )
    trainer = capture[-1]
    _lineage_entry(out, sft_out, mode)
    assert json.loads((out / "alignkit_run.json").read_text())["lineage"][-1]["quantization"] == "4-bit nf4"
    assert any(type(m).__name__ == "Linear4bit" for m in trainer.model.modules())
    # trl rounds the trainable adapter to bf16 once at init (QLoRA), so step 0 matches the reference to ~1e-3
    assert abs(log_history(out)[0]["rewards/margins"]) < 1e-2
    batch = next(iter(trainer.get_train_dataloader()))
    if mode == "continue":  # the reference: the exact SFT adapter on the same 4-bit backbone
        sft_logps = _sequence_logps(_sft_model(tiny_llama, sft_out, quantized=True), batch)
        assert torch.allclose(_reference_logps(trainer, batch), sft_logps, atol=1e-3)
    else:  # merged in full precision, then quantized: the merged copy on disk holds float weights, not 4-bit ones
        (merged,) = sft_out.glob("merged_base-*")
        with safe_open(str(merged / "model.safetensors"), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}


def test_full_finetuning_from_sft_scores_the_sft_model_once_as_reference(sft_out, tiny_llama, capture, tmp_path):
    """Without an adapter trl would load a second model from the base's path (not the SFT model); the recipe has trl
    score the starting model once, before training, instead."""
    out = tmp_path / "dpo"
    run_recipe("dpo", [*HANDOFF, "--model_name_or_path", str(sft_out), "--use_peft", "false", "--load_in_4bit", "false",
                       "--output_dir", str(out)])  # fmt: skip
    trainer = capture[-1]
    assert trainer.ref_model is None and trainer.precompute_ref_logps
    assert log_history(out)[0]["rewards/margins"] == pytest.approx(0, abs=1e-5)
    batch = next(iter(trainer.get_train_dataloader()))
    precomputed = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])
    assert torch.allclose(precomputed, _sequence_logps(_sft_model(tiny_llama, sft_out), batch), atol=1e-3)
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()


def test_reference_outputs_reload_on_their_whole_stack(tiny_llama, tmp_path):
    """cpt -> sft (reference) -> dpo (reference): loading the dpo output folds cpt, then sft, into the base."""
    lineage = []
    for stage, handoff, parent in (("cpt", None, None), ("sft", "reference", "cpt"), ("dpo", "reference", "sft")):
        out = tmp_path / stage
        lineage = [
            *lineage,
            {"stage": stage, "adapter_handoff": handoff, "from_adapter": parent and str(tmp_path / parent)},
        ]
        meta = {"stage": stage, "base_model_args": {"model_name_or_path": "tiny:llama"}, "lineage": lineage}
        out.mkdir()
        (out / "alignkit_run.json").write_text(json.dumps(meta))
        (out / "adapter_config.json").write_text(
            json.dumps({"base_model_name_or_path": "ignored: the run names its base"})
        )
    source = resolve_source(ModelArguments(model_name_or_path=str(tmp_path / "dpo")))
    assert source.fold_adapters == [str(tmp_path / "cpt"), str(tmp_path / "sft")]
    assert source.adapter_dir == str(tmp_path / "dpo") and source.base == str(tiny_llama)


def test_reference_handoff_on_a_4bit_backbone_is_refused_before_training(sft_out, tmp_path):
    out = tmp_path / "dpo"
    with pytest.raises(ConfigError, match="adapter_handoff: merge"):
        run_recipe("dpo", [*HANDOFF, "--model_name_or_path", str(sft_out), "--adapter_handoff", "reference", "--output_dir", str(out)])  # fmt: skip
    assert not out.exists()  # refused before writing anything: no folder left behind


GOOD = {"prompt": "Tell me which city is the capital of France, please.", "chosen": "Paris.", "rejected": "Rome."}
BAD_DATA = {  # rows of a file -> what the error says
    "identical": ([GOOD, GOOD, {**GOOD, "rejected": "Paris."}], "row 3: chosen and rejected are identical"),
    "empty chosen": ([GOOD, GOOD, {**GOOD, "chosen": " "}], "row 3: 'chosen' is empty"),
    "empty rejected": ([GOOD, GOOD, {**GOOD, "rejected": ""}], "row 3: 'rejected' is empty"),
    "prompt repeated": (
        [GOOD, GOOD, {**GOOD, "chosen": GOOD["prompt"] + " Paris."}],
        "row 3: 'chosen' repeats the prompt",
    ),
    "missing column": ([{"prompt": "Hi?", "chosen": "Paris.", "answer": "Rome."}] * 3, "missing columns for dpo"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_preference_data_fails_before_training_and_writes_nothing(case, tmp_path):
    rows, problem = BAD_DATA[case]
    data = write_jsonl(tmp_path / "pref.jsonl", rows)
    out = tmp_path / "out"
    with pytest.raises(DataError) as err:
        run_recipe("dpo", ["--model_name_or_path", "tiny:llama", "--datasets", str(data), "--output_dir", str(out)])
    assert f"{data}{', ' if 'row' in problem else ': '}{problem}" in str(err.value) and "Fix:" in str(err.value)
    assert not out.exists() or not list(out.iterdir())


def test_accelerate_launch_tiny_dpo_recipe_from_an_sft_output(sft_out, tmp_path):
    out = tmp_path / "dpo"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1", "--cpu",
        "--mixed_precision", "no", "--dynamo_backend", "no", "recipes/dpo.py", "--config", "recipes/tiny/dpo.yaml",
        "--model_name_or_path", str(sft_out), "--max_steps", "2", "--output_dir", str(out), "--disable_tqdm", "true",
    ]  # fmt: skip
    done = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "adapter_model.safetensors").is_file()
    meta = json.loads((out / "alignkit_run.json").read_text())
    assert (
        meta["status"] == "finished" and meta["stage"] == "dpo" and meta["lineage"][-1]["adapter_handoff"] == "continue"
    )
    assert meta["lineage"][-1]["from_adapter"] == str(sft_out)
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    assert "eval_rewards/accuracies" in meta["metrics"]
