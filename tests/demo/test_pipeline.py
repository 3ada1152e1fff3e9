"""The main job's wiring, without training: its data keeps evaluation rows out of every training split, its scorer
reads the format, and each stage's recipe, with the pipeline's overrides, reads from and writes to --out_dir."""

import re

import pytest

from alignkit.demo.data import make_rows, score, write_demo_data
from alignkit.demo.pipeline import DEMO_MODELS, DEMO_STAGES, PAIRS, STAGES, main, stage_overrides
from alignkit.stages import STAGES as REGISTRY

CHAINS = {"dpo": ("cpt", "sft", "dpo"), "grpo": ("cpt", "sft", "grpo"), "orpo": ("cpt", "orpo"),
          "kto": ("cpt", "sft", "kto"), "simpo": ("cpt", "sft", "simpo")}  # fmt: skip


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


@pytest.mark.parametrize(
    ("stage", "previous"), [("cpt", None), ("sft", "cpt"), *((c[-1], c[-2]) for c in CHAINS.values())]
)
def test_each_stage_reads_and_writes_under_out_dir(stage, previous, tmp_path):
    write_demo_data(tmp_path / "data", n_train=8, n_eval=2, n_dpo_test=2)
    if previous:
        (tmp_path / previous).mkdir()  # the earlier stage's output, as the hand-off finds it
    recipe = REGISTRY[stage].parse(
        ["--config", f"recipes/demo/{stage}.yaml", *stage_overrides(stage, tmp_path, previous)]
    )
    assert recipe.train.output_dir == str(tmp_path / stage)
    assert recipe.run.overwrite_output_dir and recipe.quant.load_in_4bit
    source = recipe.data.datasets[0]
    assert source.path.startswith(str(tmp_path / "data"))
    if previous is None:
        assert recipe.model.model_name_or_path == "smollm2:SmolLM2-135M-Instruct"
    else:
        assert recipe.model.model_name_or_path == str(tmp_path / previous)
        assert recipe.model.adapter_handoff == "continue"
    assert (source.test_split == "test") == (stage in PAIRS)


@pytest.mark.parametrize(("stage", "previous"), [("cpt", None), ("sft", "cpt"), ("dpo", "sft")])
def test_gemma3_runs_every_stage_in_gemmas_own_chat_format(stage, previous, tmp_path):
    """--model gemma3: the chain starts from the packaged base Gemma 3 270M and every stage uses Gemma 3's template."""
    write_demo_data(tmp_path / "data", n_train=8, n_eval=2, n_dpo_test=2)
    if previous:
        (tmp_path / previous).mkdir()
    argv = stage_overrides(stage, tmp_path, previous, DEMO_MODELS["gemma3"])
    recipe = REGISTRY[stage].parse(["--config", f"recipes/demo/{stage}.yaml", *argv])
    assert recipe.model.model_name_or_path == (str(tmp_path / previous) if previous else "gemma3:gemma-3-270m")
    assert recipe.model.chat_template == "gemma3"


def test_every_demo_stage_has_a_recipe_and_the_default_chain_is_cpt_sft_dpo():
    assert STAGES == ("cpt", "sft", "dpo") and set(DEMO_STAGES) == {s for c in CHAINS.values() for s in c}


@pytest.mark.parametrize("stages", ["cpt,sft,nope", "sft,sft", ""])
def test_a_bad_chain_is_refused_before_anything_runs(stages, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--stages", stages, "--out_dir", str(tmp_path / "demo")])
    assert exit_.value.code == 2 and "--stages" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


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


def test_stage_progress_line_is_not_the_weight_loading_bar(tmp_path):
    """transformers' 'Loading weights' bar (it/s, like the trainer's) is loading, not 'step 272/272, ETA 00:00'."""
    from alignkit.demo.pipeline import StageProgress

    log = tmp_path / "cpt.log"
    progress = StageProgress("cpt", log)
    log.write_text(
        "\rLoading weights:  50%|█████     | 136/272 [00:09<00:09, 13.75it/s]"
        "\rLoading weights: 100%|██████████| 272/272 [00:19<00:00, 13.75it/s]\n"
    )
    assert progress.line().startswith("[cpt] loading, ")
    log.write_text(
        log.read_text() + "\r  0%|          | 0/15 [00:00<?, ?it/s]\r  7%|▋         | 1/15 [00:39<09:06, 39.06s/it]"
    )
    assert progress.line().startswith("[cpt] step 1/15, ETA 09:06, ")


def test_the_demo_stops_when_the_merge_fails_its_parity_gate(sft_3_steps, tmp_path, monkeypatch, capsys):
    """The demo's merge step on a finished tiny run (full precision: bound 1e-3): a clean merge goes on; a merge whose
    weights are damaged (one row of the merged LM head shifted by 1.0 after merge_and_unload, before saving) is caught
    by the real parity gate (the saved model reloaded and scored against base + adapter), ``alignkit merge`` exits 1
    with the figures and the fix, and the demo stops with a message instead of scoring that model."""
    import json

    import torch
    from peft.tuners.tuners_utils import BaseTuner

    from alignkit.demo.pipeline import merge_final

    merge_final(sft_3_steps, tmp_path / "clean")  # the gate passes: the demo goes on
    assert json.loads((tmp_path / "clean" / "alignkit_run.json").read_text())["merge"]["parity_passed"]

    merge_and_unload = BaseTuner.merge_and_unload  # what PeftModel(...).merge_and_unload() runs

    def damaged(self, *args, **kwargs):
        model = merge_and_unload(self, *args, **kwargs)
        with torch.no_grad():
            model.get_output_embeddings().weight[5] += 1.0
        return model

    monkeypatch.setattr(BaseTuner, "merge_and_unload", damaged)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        merge_final(sft_3_steps, tmp_path / "final")
    assert "[merge] the demo stops here" in str(exit_.value.code)  # a message: SystemExit exits 1 with it
    err = capsys.readouterr().err
    assert "MergeParityError" in err and "above the bound 0.001" in err and "--force" in err
    merge = json.loads((tmp_path / "final" / "alignkit_run.json").read_text())["merge"]
    assert not merge["parity_passed"] and merge["max_abs_logit_diff"] > 0.1  # kept for inspection, marked failed
