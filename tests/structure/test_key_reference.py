"""``alignkit <stage> --help`` answers from a checked-in key reference (alignkit/config/keys.json, docs/keys.md)
generated from the config dataclasses; these tests hold the reference to the dataclasses and the help to its promises:
alignkit's keys and the common upstream ones first, each once, each with a default and a help line, under 60 options,
without importing torch or trl."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from alignkit.config.keyref import load_reference, render_help, render_markdown
from alignkit.stages import STAGES, key_reference

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


def test_recipe_help_from_live_classes_equals_the_cli_help(live):
    from alignkit.config.parser import RecipeParser

    stage = STAGES["dpo"]
    parser = RecipeParser((*stage.parser().dataclass_types,), name="dpo")
    assert parser.help_text(every_key=True) == render_help("dpo", live["dpo"], every_key=True)


def test_stage_without_arguments_asks_for_a_recipe():
    done = subprocess.run(
        [sys.executable, "-m", "alignkit.cli", "sft"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert done.returncode == 2 and "give --config RECIPE.yaml" in done.stderr and "Traceback" not in done.stderr
    assert not done.stdout
