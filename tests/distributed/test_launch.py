"""Two CPU ranks launched through accelerate_configs/ (DDP, ZeRO-2, ZeRO-3, ZeRO-3 with 4-bit QLoRA) on the tiny Llama.

One launch per config (a module-scoped fixture), several assertions on what it left behind: the per-rank debug log
(ALIGNKIT_DISTRIBUTED_DEBUG), trainer_state.json, the saved adapter and the gathered model's probe logits. The
reference is one process with twice the per-device batch, run in this process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, run_recipe, train_losses

from alignkit.train.distributed import DEBUG_ENV, PROBE_IDS

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.distributed

STEPS, BATCH, RANKS = 3, 2, 2
COMMON = [
    "--config", "recipes/tiny/sft.yaml", "--max_steps", str(STEPS), "--lora_dropout", "0", "--test_size", "0",
    "--gradient_checkpointing", "false", "--overwrite_output_dir",  # recipes/tiny/sft.yaml saves first at step 5
]  # fmt: skip
# Measured: per-step losses of 2 ranks x 2 and 1 process x 4 differ by < 2e-6 (fp32 sums in another order).
LOSS_ATOL = 1e-4
CONFIGS = {  # name: (accelerate config, 4-bit)
    "ddp": ("ddp.yaml", False),
    "zero2": ("zero2.yaml", False),
    "zero3": ("zero3.yaml", False),
    "zero3_qlora": ("zero3.yaml", True),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fully_partitioned_zero3(tmp: Path) -> Path:
    """The shipped ZeRO-3 config with stage3_param_persistence_threshold 0: by default (10 x hidden size) the tiny
    model's LoRA matrices stay whole on every rank, and partitioning would go unproven for them."""
    ds = json.loads((REPO / "accelerate_configs/deepspeed/zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp / "zero3.json").write_text(json.dumps(ds))
    launcher = yaml.safe_load((REPO / "accelerate_configs/zero3.yaml").read_text())
    launcher["deepspeed_config"]["deepspeed_config_file"] = str(tmp / "zero3.json")
    (tmp / "zero3.yaml").write_text(yaml.safe_dump(launcher))
    return tmp / "zero3.yaml"


def _debug(out: Path, ranks: int = RANKS) -> list[dict]:
    return [json.loads((out / f"distributed_debug_rank{r}.json").read_text()) for r in range(ranks)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, per-device batch RANKS x BATCH, full precision and 4-bit."""
    runs = {}
    mp = pytest.MonkeyPatch()
    mp.setenv(DEBUG_ENV, "1")
    mp.chdir(REPO)
    try:
        for four_bit in (False, True):
            out = tmp_path_factory.mktemp(f"single_4bit{four_bit}")
            run_recipe("sft", [*COMMON, "--load_in_4bit", str(four_bit).lower(),
                               "--per_device_train_batch_size", str(RANKS * BATCH), "--output_dir", str(out)])  # fmt: skip
            runs[four_bit] = out
    finally:
        mp.undo()
    return runs


def _launch(config: Path, recipe: str, argv: list[str]) -> None:
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
        "--num_processes", str(RANKS), "--main_process_port", str(_free_port()), recipe, *argv,
    ]  # fmt: skip
    # The ranks import this checkout's alignkit, whichever copy pip's editable install points at.
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, DEBUG_ENV: "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{config.name} {recipe} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module", params=list(CONFIGS))
def launched(request, tmp_path_factory):
    name = request.param
    config_file, four_bit = CONFIGS[name]
    tmp = tmp_path_factory.mktemp(name)
    config = _fully_partitioned_zero3(tmp) if config_file == "zero3.yaml" else REPO / "accelerate_configs" / config_file
    out = tmp / "out"
    _launch(config, "recipes/sft.py", [*COMMON, "--load_in_4bit", str(four_bit).lower(),
                                       "--per_device_train_batch_size", str(BATCH), "--output_dir", str(out)])  # fmt: skip
    return name, four_bit, out


def test_each_rank_trains_its_own_rows(launched, reference):
    name, four_bit, out = launched
    ranks = _debug(out)
    assert [r["rank"] for r in ranks] == list(range(RANKS)) and all(r["world_size"] == RANKS for r in ranks)
    rows = [r["rows"] for r in ranks]
    assert all(len(seen) == STEPS * BATCH for seen in rows), [len(seen) for seen in rows]
    assert not set(rows[0]) & set(rows[1]), f"{name}: both ranks trained on the same rows"
    single = _debug(reference[four_bit], ranks=1)[0]["rows"]
    # Together the ranks saw exactly the rows one process with the doubled batch saw.
    assert sorted(rows[0] + rows[1]) == sorted(single)


def test_loss_matches_one_process_with_twice_the_batch(launched, reference):
    name, four_bit, out = launched
    distributed, single = train_losses(out), train_losses(reference[four_bit])
    assert len(distributed) == STEPS and len(single) == STEPS
    print(
        f"{name}: losses {distributed} vs {single}, max diff {max(abs(a - b) for a, b in zip(distributed, single)):.1e}"
    )
    assert distributed == pytest.approx(single, abs=LOSS_ATOL, rel=0), f"{name}: {distributed} vs {single}"
    assert distributed[-1] < distributed[0]


def test_saved_adapter_reloads_with_the_gathered_logits(launched):
    from peft import PeftModel
    from safetensors.torch import load_file

    from alignkit.config import ModelArguments, QuantizationArguments
    from alignkit.models.loader import load_base_model

    name, four_bit, out = launched
    gathered = load_file(str(out / "distributed_debug_logits.safetensors"))["logits"]
    base = load_base_model(
        ModelArguments(model_name_or_path="tiny:llama"), QuantizationArguments(load_in_4bit=four_bit)
    )
    probe = torch.tensor([PROBE_IDS])
    with torch.no_grad():
        base_logits = base(input_ids=probe).logits
        reloaded = PeftModel.from_pretrained(base, str(out)).eval()
        logits = reloaded(input_ids=probe).logits
    assert (logits - base_logits).abs().max() > 1e-3, f"{name}: the saved adapter does not change the model"
    print(f"{name}: reloaded vs gathered logits, max diff {(logits - gathered).abs().max().item():.1e}")
    torch.testing.assert_close(logits, gathered, atol=1e-5, rtol=0)


def test_only_zero3_splits_parameters_and_each_rank_holds_half(launched):
    name, four_bit, out = launched
    for rank in _debug(out):
        print(f"{name} rank {rank['rank']}: " + ", ".join(f"{k} {v}" for k, v in rank.items() if k.startswith("zero3")))
        if not name.startswith("zero3"):  # DDP and ZeRO-2 keep the whole model on every rank
            assert "zero3_numel" not in rank
            continue
        # ds_tensor partitions are padded to a multiple of the world size: at most RANKS - 1 extra elements each.
        assert rank["zero3_numel"] / 2 <= rank["zero3_local_numel"] < rank["zero3_numel"] / 2 + 1000
        assert rank["zero3_trainable_local_numel"] == pytest.approx(rank["zero3_trainable_numel"] / 2, abs=100)
        assert rank["zero3_materialised_numel"] == 0  # after a step no parameter stays gathered
        if four_bit:  # the packed 4-bit weights (stored as the compute dtype) are partitioned too
            assert rank["zero3_4bit_numel"] > 0
            assert rank["zero3_4bit_local_numel"] == pytest.approx(rank["zero3_4bit_numel"] / 2, abs=100)


def test_task_head_evaluates_before_training_under_deepspeed_at_one_process_scale(tmp_path):
    """The MLM task evaluates the untrained model first. Under DeepSpeed that happens at step 0 inside train()
    (evaluate() before train() would leave DeepSpeed without a training engine), and the BERT head's loss, a plain
    mean that ignores num_items_in_batch, must not come out multiplied by the number of ranks."""
    argv = ["--config", "recipes/tiny/task_mlm.yaml", "--max_steps", "2", "--overwrite_output_dir"]
    single = run_recipe("task", [*argv, "--output_dir", str(tmp_path / "single")])
    _launch(REPO / "accelerate_configs/zero2.yaml", "recipes/task.py", [*argv, "--output_dir", str(tmp_path / "zero2")])
    metrics = json.loads((tmp_path / "zero2" / "alignkit_run.json").read_text())["metrics"]
    assert metrics["before_loss"] == pytest.approx(single["before_loss"], rel=1e-5)
    assert metrics["before_perplexity"] == pytest.approx(single["before_perplexity"], rel=1e-5)


@pytest.mark.parametrize(
    "recipe, config", [("cpt", "cpt"), ("dpo", "dpo"), ("task", "task_ner"), ("task", "task_seq2seq")]
)
def test_every_stage_shards_rows_and_parameters_under_zero3(recipe, config, tmp_path):
    """The other stages and an encoder and an encoder-decoder head, under the shipped ZeRO-3 config (4-bit, as the
    tiny recipes are): each rank trains its own rows and holds half of the partitioned parameters. Row hashes may
    repeat across ranks only where the data itself repeats rows (the tiny NER and seq2seq sets do)."""
    out = tmp_path / "out"
    # recipes/tiny/dpo.yaml starts from the tiny SFT stage's output: start from the base model instead
    base = ["--model_name_or_path", "tiny:llama"] if recipe == "dpo" else []
    _launch(REPO / "accelerate_configs/zero3.yaml", f"recipes/{recipe}.py",
            ["--config", f"recipes/tiny/{config}.yaml", *base, "--max_steps", "2", "--output_dir", str(out), "--overwrite_output_dir"])  # fmt: skip
    ranks = _debug(out)
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == RANKS for r in ranks)
    rows = [r["rows"] for r in ranks]
    assert all(rows) and len(set(rows[0]) & set(rows[1])) <= _repeated_rows(config), (
        f"{config}: both ranks saw the same rows"
    )
    for rank in ranks:
        assert rank["zero3_numel"] / 2 <= rank["zero3_local_numel"] < rank["zero3_numel"] / 2 + 1000
    assert train_losses(out) and (out / "adapter_model.safetensors").is_file()


def _repeated_rows(config: str) -> int:
    """How many rows of the recipe's training file are copies of an earlier row."""
    recipe = yaml.safe_load((REPO / f"recipes/tiny/{config}.yaml").read_text())
    paths = [d if isinstance(d, str) else d["path"] for d in recipe["datasets"]]
    lines = [line for path in paths for line in (REPO / path).read_text().splitlines() if line.strip()]
    return len(lines) - len(set(lines))
