"""The ``speedups`` key and the table's three phases: ``none`` trains SFT with no speed-up applied and the same loss
(within the padding-free and attention exactness bounds), ``auto`` records what ran in alignkit_run.json and the model
card, a name is checked with did-you-mean, and building a config object changes nothing in the process."""

import json

import pytest
import torch
from conftest import run_recipe, train_losses

from alignkit import speedups
from alignkit.errors import ConfigError
from alignkit.runs import RunRecord
from alignkit.stages import STAGES

TINY = ["--config", "recipes/tiny/sft.yaml", "--test_size", "0", "--disable_tqdm", "true", "--load_in_4bit", "false",
        "--lora_dropout", "0", "--optim", "sgd", "--learning_rate", "0.5", "--max_steps", "3", "--save_strategy", "no",
        "--per_device_train_batch_size", "8"]  # fmt: skip


def test_speedups_none_trains_sft_with_none_applied_and_the_same_loss(tmp_path):
    from trl.trainer import utils as trl_utils

    from alignkit.speedups.lm_head import CpuFirstLogProbFunction

    runs = {}
    for choice in ("auto", "none"):
        out = tmp_path / choice
        run_recipe("sft", [*TINY, "--output_dir", str(out), "--speedups", choice])
        runs[choice] = out
        if choice == "none":  # the LM head patch is process-wide: `none` gives trl its own function back
            assert trl_utils._ChunkedLogProbFunction is not CpuFirstLogProbFunction
    ran = {c: RunRecord.read(out).last.speedups for c, out in runs.items()}
    assert ran["none"] == {}, ran["none"]
    assert {"padding_free", "per_document_attention", "cpu_lm_head"} <= set(ran["auto"]["trainer"]), ran["auto"]
    assert "## Speed-ups" in (runs["auto"] / "README.md").read_text()
    assert "## Speed-ups" not in (runs["none"] / "README.md").read_text()
    with_, without = train_losses(runs["auto"]), train_losses(runs["none"])
    assert len(with_) == len(without) == 3
    # padding-free batches: <= 1.5e-7 relative (tests/regression); per-document attention: 4e-7 (test_attention.py)
    assert with_ == pytest.approx(without, rel=1e-5), (with_, without)
    assert with_[-1] < with_[0], "the loss did not fall: the comparison would prove nothing"


def test_a_list_applies_only_the_rows_named(tmp_path):
    out = tmp_path / "lm_head_only"
    run_recipe("sft", [*TINY, "--output_dir", str(out), "--max_steps", "1", "--speedups", "[cpu_lm_head]"])
    assert RunRecord.read(out).last.speedups == {"trainer": ["cpu_lm_head"]}
    assert json.loads((out / "alignkit_run.json").read_text())["lineage"][-1]["speedups"] == {
        "trainer": ["cpu_lm_head"]
    }


def test_an_unknown_name_is_refused_with_the_nearest_one():
    with pytest.raises(ConfigError, match=r"speedups: 'cpu_lm_haed' is not a speed-up\. Did you mean 'cpu_lm_head'\?"):
        STAGES["sft"].parse([*TINY, "--speedups", "[cpu_lm_haed]"])
    with pytest.raises(ConfigError, match="speedups: 3 is a number, not text or a list.*e.g. speedups: auto"):
        STAGES["sft"].parse([*TINY, "--speedups", "3"])


def test_required_fixes_apply_whatever_the_key_says():
    assert speedups.chosen("none") == ("keep_4bit_training_layout", "adapter_dtype")
    assert set(speedups.chosen("auto")) == set(speedups.NAMES)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_building_a_config_changes_nothing_in_the_process(stage, monkeypatch):
    from alignkit.speedups import cpu

    calls = []
    monkeypatch.setattr(cpu, "fit_cpu_threads", lambda: calls.append("threads"))
    monkeypatch.setattr(cpu, "fit_cpu_allocator", lambda: calls.append("allocator"))
    monkeypatch.setattr(speedups, "apply", lambda *a, **k: calls.append("apply"))
    threads = torch.get_num_threads()
    argv = ["--config", f"recipes/tiny/{stage if stage != 'task' else 'task_ner'}.yaml"]
    STAGES[stage].config_class(output_dir="/tmp/alignkit-unused")
    if stage != "task":
        STAGES[stage].parse(argv)
    assert calls == [] and torch.get_num_threads() == threads
