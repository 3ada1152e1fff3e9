"""The main job's wiring, without training: its data keeps evaluation rows out of every training split, its scorer
reads the format, and each stage's recipe, with the pipeline's overrides, reads from and writes to --out_dir."""

import re

import pytest

from alignkit.config import CPTConfig, DPOConfig, SFTConfig, parse_recipe
from alignkit.demo.data import make_rows, score, write_demo_data
from alignkit.demo.pipeline import STAGES, stage_overrides

STAGE_CONFIGS = {"cpt": CPTConfig, "sft": SFTConfig, "dpo": DPOConfig}


def _questions(rows, key):
    return {re.search(r"\d+ \+ \d+", str(row[key])).group() for row in rows}


def test_held_out_questions_are_in_no_training_split():
    rows = make_rows()
    evals, dpo_test = _questions(rows["eval"], "messages"), _questions(rows["dpo_test"], "prompt")
    trained = _questions(rows["cpt"], "text") | _questions(rows["sft"], "messages") | _questions(rows["dpo"], "prompt")
    assert len(evals) == 50 and len(dpo_test) == 32 and len(trained) == 400
    assert not evals & trained and not dpo_test & trained and not evals & dpo_test


@pytest.mark.parametrize(
    "reply, gold, expected",
    [
        ("12 + 30 = 42.\nANSWER: 42", 42, {"format": True, "exact": True}),
        ("ANSWER: 41", 42, {"format": True, "exact": False}),
        ("The sum is 42.", 42, {"format": False, "exact": False}),
    ],
)
def test_score_reads_the_answer_line(reply, gold, expected):
    assert score(reply, gold) == expected


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_reads_and_writes_under_out_dir(stage, tmp_path):
    write_demo_data(tmp_path / "data", n_train=8, n_eval=2, n_dpo_test=2)
    for earlier in STAGES[: STAGES.index(stage)]:  # an earlier stage's output, as the hand-off finds it
        (tmp_path / earlier).mkdir()
    recipe = parse_recipe(
        STAGE_CONFIGS[stage], ["--config", f"recipes/demo/{stage}.yaml", *stage_overrides(stage, tmp_path)]
    )
    assert recipe.train.output_dir == str(tmp_path / stage)
    assert recipe.run.overwrite_output_dir and recipe.quant.load_in_4bit
    source = recipe.data.datasets[0]
    assert source.path.startswith(str(tmp_path / "data"))
    if stage == "cpt":
        assert recipe.model.model_name_or_path == "smollm2:SmolLM2-135M-Instruct"
    else:
        assert recipe.model.model_name_or_path == str(tmp_path / STAGES[STAGES.index(stage) - 1])
        assert recipe.model.adapter_handoff == "continue"
    if stage == "dpo":
        assert source.test_split == "test"


def test_stage_progress_line_reads_the_trainers_bar_and_loss(tmp_path):
    """The demo's console line for a running stage (issue 21): the trainer's tqdm position and ETA and the last
    logged loss, from the stage's log; dataset bars ('examples/s') are not the trainer's."""
    from alignkit.demo.pipeline import StageProgress

    log = tmp_path / "sft.log"
    progress = StageProgress("sft", log)
    log.write_text("Tokenizing train dataset: 100%|##| 400/400 [00:00<00:00, 9000.00 examples/s]\n")
    assert progress.line().startswith("[sft] loading, ")
    log.write_text(
        log.read_text()
        + " 25%|##    | 10/40 [00:20<01:00,  2.00s/it]{'loss': '1.234', 'grad_norm': '0.5', 'epoch': '0.1'}\n"
        + " 40%|####  | 16/40 [00:31<00:45,  1.90s/it]"
    )
    assert progress.line().startswith("[sft] step 16/40, loss 1.234, ETA 00:45, ")
