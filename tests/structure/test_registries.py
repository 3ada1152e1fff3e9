"""One owner per concern: the run record, the model-source table, the head table, the task and stage registries."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from alignkit.config import ModelArguments, QuantizationArguments
from alignkit.errors import ConfigError
from alignkit.models import HEADS, packaged, resolve_source
from alignkit.runs import FORMAT, BaseModelRef, LineageEntry, MergeInfo, RunRecord
from alignkit.stages import STAGES
from alignkit.tasks import TASKS

REPO = Path(__file__).resolve().parents[2]


def _record() -> RunRecord:
    config = {"QuantizationArguments": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "retired_key": 1}}
    sft = LineageEntry(stage="sft", output_dir="out/sft", task="causal_lm", adapter="lora", config=config)
    merge = MergeInfo("dequantize", 1e-4, 1e-3, True, 2.5, 2.5, 0.0)
    return RunRecord(
        stage="sft",
        status="finished",
        base_model_args=BaseModelRef("tiny:llama"),
        lineage=[sft, LineageEntry(stage="merge", output_dir="out/m", from_adapter="out/sft", merge=merge)],
        metrics={"eval_loss": 1.5, "bad": float("nan")},
        merge=merge,
    )


def test_run_record_round_trips_and_builds_typed_groups(tmp_path):
    _record().write(tmp_path)
    back = RunRecord.read(tmp_path)
    assert back.format == FORMAT and back.finished and back.last.merge.method == "dequantize"
    assert back.lineage[0].group(QuantizationArguments) == QuantizationArguments(load_in_4bit=True)
    assert back.metrics == {"eval_loss": 1.5, "bad": "nan"}  # JSON has no NaN
    assert json.loads(RunRecord.path(tmp_path).read_text())["lineage"][1]["method"] == "dequantize"


def test_run_record_refuses_an_unknown_format_with_the_fix(tmp_path):
    data = _record().to_json()
    del data["format"]  # written before the field existed: format 1's layout
    RunRecord.path(tmp_path).write_text(json.dumps(data))
    assert RunRecord.read(tmp_path).stage == "sft"
    RunRecord.path(tmp_path).write_text(json.dumps({**data, "format": FORMAT + 1}))
    with pytest.raises(ConfigError, match=r"alignkit_run.json: run record format 2.*Fix: upgrade alignkit"):
        RunRecord.read(tmp_path)


def test_one_cache_dir_even_when_the_variable_is_empty(monkeypatch):
    monkeypatch.setenv("ALIGNKIT_CACHE", "")
    assert packaged.cache_dir() == Path.home() / ".cache" / "alignkit"
    monkeypatch.setenv("ALIGNKIT_CACHE", "/tmp/x")
    assert packaged.cache_dir() == Path("/tmp/x")


@pytest.mark.parametrize(
    "name, message",
    [
        ("nosuch:model", r"names no known model scheme.*'smollm2:', 'tiny:'"),
        ("tiny:gpt9", r"unknown tiny model 'tiny:gpt9'"),
        ("smollm2:Other", r"unknown packaged model 'smollm2:Other'"),
        ("./no/such/model", r"'./no/such/model' does not exist"),
        ("model.gguf", r"GGUF file model.gguf not found"),
    ],
)
def test_model_source_errors_name_the_fix(name, message):
    with pytest.raises(ConfigError, match=message):
        resolve_source(ModelArguments(model_name_or_path=name))


def test_a_head_is_one_task_module_and_one_row():
    # every head is a task module's, or a stage's own (causal_lm; embedding: recipes/embed.py); the task stage's head
    # is its recipe's task: key (head None in the registry)
    assert set(TASKS) | {stage.head for stage in STAGES.values() if stage.head} == set(HEADS)
    assert STAGES["task"].head is None
    assert set(TASKS).isdisjoint({"causal_lm", "embedding"})
    for name, task in TASKS.items():
        assert task.name == name and dataclasses.is_dataclass(task.Arguments), name


def test_every_stage_resolves_and_has_a_short_recipe():
    for name, stage in STAGES.items():
        assert stage.config_class.__name__ == stage.config and isinstance(stage.trainer_class, type)
        recipe = REPO / "recipes" / f"{name}.py"
        assert len(recipe.read_text().splitlines()) < 40, f"{recipe} grew past 40 lines"


def test_preference_recipes_are_one_body():
    """recipes/<stage>.py is the public entry point (accelerate launch recipes/dpo.py), so each preference stage keeps
    its file, but not a copy of a recipe: each is its docstring around alignkit.train.preference.preference_main, the
    same code but for the stage name."""
    import ast

    bodies = {}
    for path in sorted((REPO / "recipes").glob("*.py")):
        tree = ast.parse(path.read_text())
        if ast.get_docstring(tree) is not None:
            tree.body = tree.body[1:]
        code = ast.unparse(tree)
        if "preference_main" in code:
            bodies[path.stem] = code.replace(f"STAGES['{path.stem}']", "STAGES[<stage>]")
    assert {"dpo", "kto", "orpo", "simpo"} <= set(bodies)
    assert len(set(bodies.values())) == 1, bodies


@pytest.mark.parametrize("stage", ["cpt", "sft", "dpo"])
def test_stage_recipes_refuse_the_task_key(stage, capfd):
    """``python recipes/sft.py`` as a script; cpt and dpo through the same run_cli their __main__ calls, in-process."""
    argv = ["--config", f"recipes/tiny/{stage}.yaml", "--task", "qa"]
    if stage == "sft":
        done = subprocess.run([sys.executable, f"recipes/{stage}.py", *argv], cwd=REPO, capture_output=True, text=True)
        code, stderr = done.returncode, done.stderr
    else:
        import runpy

        from alignkit.errors import run_cli

        main = runpy.run_path(str(REPO / "recipes" / f"{stage}.py"), run_name="alignkit_recipe")["main"]
        with pytest.raises(SystemExit) as exited:
            run_cli(main, argv)
        code, stderr = exited.value.code, capfd.readouterr().err
    assert code == 2, stderr[-2000:]
    assert "unknown key 'task'" in stderr and "a key of the task recipe" in stderr
    assert "Traceback" not in stderr


def test_task_recipe_refuses_another_tasks_key():
    from alignkit.tasks import parse_task_recipe

    with pytest.raises(ConfigError, match="doc_stride: a key of task qa, not of task token_cls"):
        parse_task_recipe(["--config", str(REPO / "recipes/tiny/task_ner.yaml"), "--doc_stride", "8"])
    with pytest.raises(ConfigError, match="task: 'ner' is not a task"):
        parse_task_recipe(["--config", str(REPO / "recipes/tiny/task_ner.yaml"), "--task", "ner"])


def test_every_default_obeys_the_range_table():
    """The range rules (alignkit.config.ranges) check what a recipe sets; the defaults themselves must pass them."""
    from alignkit.config import AdapterArguments, DataArguments, QuantizationArguments, RunArguments
    from alignkit.config.ranges import check_ranges

    for stage in STAGES.values():
        groups = [stage.config_class(output_dir="/tmp/alignkit-unused"), *(c() for c in stage.extra_classes)]
        check_ranges(
            [*groups, ModelArguments(), QuantizationArguments(), AdapterArguments(), DataArguments(), RunArguments()]
        )
    for task in TASKS.values():
        check_ranges([task.Arguments()])


def test_named_chat_templates_are_known_to_the_config_check():
    """config/args checks chat_template names without importing data/ (a lower layer): the two lists must agree."""
    from alignkit.config.args import NAMED_CHAT_TEMPLATES
    from alignkit.data.chat_families import family_names

    assert set(NAMED_CHAT_TEMPLATES) == set(family_names())


def test_choice_lists_are_upstream_s():
    """alignkit.config.ranges.CHOICES copies lists that upstream checks late; each must be upstream's own."""
    import dataclasses
    import re

    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK
    from trl import DPOConfig, GRPOConfig

    from alignkit.config.ranges import CHOICES

    help_text = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(DPOConfig)}
    assert set(CHOICES["loss_type"]["DPOConfig"]) == set(re.findall(r"`'(\w+)'`", help_text["loss_type"]))
    divergences = help_text["f_divergence_type"].split("Only")[0]
    assert set(CHOICES["f_divergence_type"]["DPOConfig"]) == set(re.findall(r"`(\w+)`", divergences))
    grpo_help = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(GRPOConfig)}
    supported = grpo_help["loss_type"].split("Supported values are")[1].split(". ")[0]
    assert set(CHOICES["loss_type"]["GRPOConfig"]) == set(re.findall(r"'(\w+)'", supported))
    assert set(CHOICES["importance_sampling_level"]["GRPOConfig"]) == set(
        re.findall(r"`'(\w+)'`", grpo_help["importance_sampling_level"])
    )
    assert set(CHOICES["report_to"]["*"]) == set(INTEGRATION_TO_CALLBACK) | {"none", "all"}
