"""``alignkit <stage> --help`` answers from a checked-in key reference (alignkit/config/keys.json, docs/keys.md)
generated from the config dataclasses; these tests hold the reference to the dataclasses and the help to its promises:
alignkit's keys and the common upstream ones first, each once, each with a default and a help line, under 60 options,
without importing torch or trl."""

import dataclasses
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alignkit.cli import main as cli_main
from alignkit.config.keyref import load_reference, render_help, render_markdown
from alignkit.stages import STAGES
from alignkit.tasks import TASKS, key_reference

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def live():
    return key_reference()


def test_checked_in_reference_matches_the_dataclasses(live):
    assert load_reference() == live, "a config dataclass changed: run `python scripts/write_key_reference.py`"
    assert (REPO / "docs" / "keys.md").read_text() == render_markdown(live), (
        "docs/keys.md is stale: run `python scripts/write_key_reference.py`"
    )


def _options(text: str) -> list[str]:
    return re.findall(r"^  (--\w[\w-]*)", text, flags=re.M)


@pytest.mark.parametrize("stage", list(STAGES))
def test_help_lists_each_key_once_with_default_and_help_under_60_options(stage, live):
    text = render_help(stage, live[stage])
    options = _options(text)
    assert len(options) < 60, f"{stage} --help lists {len(options)} options"
    assert len(options) == len(set(options)), [o for o in options if options.count(o) > 1]
    assert {"--config", "--print_config", "--help-all"} <= set(options)
    assert all(r["help"] for r in live[stage]), [r["key"] for r in live[stage] if not r["help"]]  # --help-all too
    for key in ("output_dir", "learning_rate", "per_device_train_batch_size", "lora_r", "load_in_4bit", "datasets"):
        assert f"\n  --{key} " in text, key
    every = render_help(stage, live[stage], every_key=True)
    assert len(_options(every)) == len(live[stage]) + 3  # every key once, plus the parser's flags
    assert "--local_rank" in every and "--local_rank" not in text


def test_help_shows_alignkit_defaults(live):
    text = render_help("sft", live["sft"])
    assert re.search(r"--lora_r int  default: 16\n", text)
    assert re.search(r"--output_dir str  default: \"outputs/run\"\n", text)  # alignkit's default, not upstream's
    assert "(also SFTConfig)" in text  # trust_remote_code / dataset_num_proc: listed once, the other group named


def test_cli_help_imports_neither_torch_nor_trl():
    code = (
        "import sys, contextlib, io; from alignkit.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out: code = main(['sft', '--help'])\n"
        "assert code == 0 and '--lora_r' in out.getvalue(), out.getvalue()\n"
        "heavy = sorted(m for m in ('torch', 'trl', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def _recipe_main(stage: str):
    """``main`` of this checkout's recipes/<stage>.py (the installed alignkit.recipes may be another checkout's)."""
    spec = importlib.util.spec_from_file_location(f"_recipe_{stage}", REPO / "recipes" / f"{stage}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("flag", ["--help", "--help-all"])
@pytest.mark.parametrize("stage", list(STAGES))
def test_recipe_help_from_live_classes_equals_the_cli_help(stage, flag, capsys):
    """`python recipes/<stage>.py --help-all` (the live parser the recipe reads: for task, every head's keys) and
    `alignkit <stage> --help-all` (the checked-in reference) list the same keys with the same text."""
    with pytest.raises(SystemExit) as done:
        _recipe_main(stage)([flag])
    assert done.value.code == 0
    recipe_help = capsys.readouterr().out
    assert cli_main([stage, flag]) == 0
    assert capsys.readouterr().out.strip() == recipe_help.strip()


def _keys_md_section(stage: str) -> str:
    text = (REPO / "docs" / "keys.md").read_text()
    return text.split(f"\n## {stage}\n", 1)[1].split("\n## ", 1)[0]


@pytest.mark.parametrize("head", list(TASKS))
def test_every_head_key_is_in_every_surface(head, capsys):
    """Each task head's own keys (Task.Arguments) are in keys.json / docs/keys.md with their help, in
    `alignkit task --help-all`, and get their help as a comment from `alignkit init task`."""
    fields = dataclasses.fields(TASKS[head].Arguments) if TASKS[head].Arguments else ()
    reference = {r["key"]: r for r in load_reference()["task"]}
    assert cli_main(["task", "--help-all"]) == 0
    every, section = capsys.readouterr().out, _keys_md_section("task")
    for field in fields:
        key = field.name
        assert reference.get(key, {}).get("help") == " ".join(field.metadata["help"].split()), key
        assert re.search(rf"^  --{key} .*\n      {re.escape(reference[key]['help'][:40])}", every, re.M), key
        assert re.search(
            rf"^\| \*{{0,2}}`{key}`\*{{0,2}} \|.*\| {re.escape(reference[key]['help'])} \|$", section, re.M
        ), key


def _stage_of(recipe: Path, values: dict) -> str:
    if "task" in values:
        return "task"
    return max((s for s in STAGES if recipe.stem == s or recipe.stem.startswith(s + "_")), key=len)


@pytest.mark.parametrize(
    "recipe", sorted((REPO / "recipes").glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}"
)
def test_every_key_a_shipped_recipe_sets_has_help(recipe):
    """`alignkit init` comments each key of the shipped recipe it copies with its help from the reference: every key
    any shipped recipe sets (each task head's included) has one."""
    values = yaml.safe_load(recipe.read_text())
    helps = {r["key"]: r["help"] for r in load_reference()[_stage_of(recipe, values)]}
    assert [k for k in values if not helps.get(k)] == []


def test_stage_without_arguments_asks_for_a_recipe():
    done = subprocess.run(
        [sys.executable, "-m", "alignkit.cli", "sft"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert done.returncode == 2 and "give --config RECIPE.yaml" in done.stderr and "Traceback" not in done.stderr
    assert not done.stdout
