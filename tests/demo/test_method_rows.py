"""The methods table's rows of the demo (docs/methods.md): ``--stages`` takes them after the demo's SFT
(``--start_from``), each row's recipe with the pipeline's overrides reads its own data under --out_dir and continues
the given SFT output; unknown stages and a --start_from that is not a finished run are refused before anything runs.
No training here (the SmolLM2 rows are measured by hand: docs/methods.md)."""

import json

import pytest

from alignkit.demo.pipeline import DEMO_STAGES, METHODS, main, recipe_of, stage_overrides, table
from alignkit.demo.tool_data import TOOLS, write_tool_data
from alignkit.stages import STAGES as REGISTRY


@pytest.mark.parametrize("stages", ["grpo", "dr_grpo", "rloo", "tool_sft,tool_grpo", "cpt,sft,dr_grpo"])
def test_method_rows_are_accepted_stages(stages):
    import argparse

    from alignkit.demo.pipeline import parse_stages

    assert parse_stages(argparse.ArgumentParser(), stages) == tuple(stages.split(","))


@pytest.mark.parametrize("stages", ["dr_grpo,nope", "rloo,rloo", "tool", ","])
def test_unknown_or_repeated_method_rows_are_refused_before_anything_runs(stages, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--stages", stages, "--out_dir", str(tmp_path / "demo")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--stages" in err and "dr_grpo" in err and "tool_grpo" in err
    assert not (tmp_path / "demo").exists()


def test_start_from_must_be_a_finished_stage_output(tmp_path, capsys):
    (tmp_path / "sft").mkdir()
    with pytest.raises(SystemExit) as exit_:
        main(["--stages", "rloo", "--start_from", str(tmp_path / "sft"), "--out_dir", str(tmp_path / "demo")])
    assert exit_.value.code == 2 and "--start_from" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("stage", sorted(METHODS))
def test_each_method_row_runs_its_recipe_on_its_data_after_the_given_sft(stage, tmp_path):
    from alignkit.demo.data import write_demo_data

    write_demo_data(tmp_path / "data", n_train=8, n_eval=2, n_dpo_test=2)
    write_tool_data(tmp_path / "data", n_train=8)
    start = tmp_path / "elsewhere" / "sft"
    start.mkdir(parents=True)
    recipe_stage, yaml = recipe_of(stage)
    recipe = REGISTRY[recipe_stage].parse(
        ["--config", f"recipes/demo/{yaml}.yaml", *stage_overrides(stage, tmp_path, str(start))]
    )
    assert recipe.train.output_dir == str(tmp_path / stage)
    if METHODS[stage].teacher:  # the given run teaches; the student starts from the base model
        assert recipe.train.teacher_model_name_or_path == str(start)
        assert recipe.model.model_name_or_path == "smollm2:SmolLM2-135M-Instruct"
    else:
        assert recipe.model.model_name_or_path == str(start) and recipe.model.adapter_handoff == "continue"
    source = recipe.data.datasets[0]
    assert source.path == str(tmp_path / "data" / f"{METHODS[stage].data}.jsonl")
    assert (tmp_path / "data" / f"{METHODS[stage].data}.jsonl").is_file()
    if stage == "dr_grpo":
        assert recipe.train.loss_type == "dr_grpo"
    if stage == "tool_grpo":
        assert recipe.extra[-1].tools == ["alignkit.demo.tool_data:calculator"]
        row = json.loads((tmp_path / "data" / "tool_grpo.jsonl").read_text().splitlines()[0])
        assert row["tools"] == TOOLS and row["prompt"][-1]["role"] == "user" and "answer" in row
    if stage == "tool_sft":
        assert recipe.model.chat_template == "qwen2_5"


def test_a_distilled_student_needs_its_teacher_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--stages", "distill", "--out_dir", str(tmp_path / "demo")])
    assert exit_.value.code == 2 and "--start_from" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_method_rows_do_not_shadow_the_chain_stages():
    assert not set(METHODS) & set(DEMO_STAGES)


def test_the_table_names_each_method_row_and_the_tool_use_share():
    results = {
        "base": {"format": 1.0, "exact": 0.62},
        "tool_sft": {"format": 0.9, "exact": 0.8, "tool_use": 0.95},
        "final": {"format": 1.0, "exact": 0.9, "tool_use": 1.0},
    }
    text = table(results, {"tool_sft": 100.0, "tool_grpo": 200.0}, {}, 50, ("tool_sft", "tool_grpo"), "start: sft")
    lines = text.splitlines()
    assert "tool use" in lines[1]
    assert lines[2].startswith("base (start: sft)") and lines[2].rstrip().endswith("-")
    assert lines[3].startswith("+tool-call SFT (calculator)") and lines[3].rstrip().endswith("95%")
    assert lines[4].startswith("+tool-use GRPO (calculator) (merged, final)") and "200 s" in lines[4]
