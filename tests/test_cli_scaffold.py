"""alignkit.scaffold: `alignkit recipes`, `alignkit init <stage>` and the `--accelerate_config` launch command, from
the shipped files (the wheel's contents and a run from it: tests/structure/test_install.py)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alignkit.cli import main
from alignkit.errors import ConfigError
from alignkit.scaffold import launch_command, list_recipes, shipped, write_recipe
from alignkit.stages import STAGES

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("stage", list(STAGES))
def test_init_writes_a_commented_recipe_with_sample_data(stage, tmp_path):
    written = write_recipe(stage, tmp_path / f"{stage}.yaml", model="tiny:llama" if stage != "task" else None)
    text = written[0].read_text()
    values = yaml.safe_load(text)
    assert values["output_dir"] == f"outputs/{stage}" and text.startswith(f"# alignkit {stage} recipe")
    assert "# LoRA rank" in text or "lora_r" not in values  # each key carries its help
    for line in text.splitlines():  # every key (each task head's too), its help's first clause, brackets whole
        if re.match(r"\w+:", line):
            comment = line.partition(" # ")[2]
            assert comment, f"no help comment: {line}"
            assert all(comment.count(a) == comment.count(b) for a, b in ("()", "[]")) or comment.endswith("..."), line
    if stage == "task":
        assert re.search(r"^max_length: \d+ +# Max tokens per input \(QA: per window\)$", text, re.M), text
        assert re.search(r"^label_list: .* # token_cls/seq_cls: every label, in id order", text, re.M), text
    for source in values["datasets"]:
        path = source["path"] if isinstance(source, dict) else source
        assert (tmp_path / path).is_file(), path  # the sample data, copied beside the recipe
    with pytest.raises(ConfigError, match="exists.*--force"):
        write_recipe(stage, tmp_path / f"{stage}.yaml")


def test_init_recipe_parses_and_takes_your_data(tmp_path, monkeypatch):
    data = tmp_path / "mine.jsonl"
    data.write_text((REPO / "recipes/tiny/data/dpo.jsonl").read_text())
    monkeypatch.chdir(tmp_path)
    assert main(["init", "dpo", "--model", "tiny:llama", "--data", str(data), "--out", "dpo.yaml"]) == 0
    recipe = STAGES["dpo"].parse(["--config", "dpo.yaml"])
    assert recipe.model.model_name_or_path == "tiny:llama"
    assert [s.path for s in recipe.data.datasets] == [str(data)] and not (tmp_path / "data").exists()


def test_init_recipes_chain_from_the_sft_recipe_init_writes(tmp_path):
    """`alignkit init sft` writes to outputs/sft; the recipes that start from an SFT run read it there (not the
    clone's outputs/tiny/sft), and dpo then kto share their sample data file rather than refusing it."""
    sft = yaml.safe_load(write_recipe("sft", tmp_path / "sft.yaml")[0].read_text())
    for stage, key in [("dpo", "model_name_or_path"), ("kto", "model_name_or_path"), ("grpo", "model_name_or_path"),
                       ("distill", "teacher_model_name_or_path")]:  # fmt: skip
        written = write_recipe(stage, tmp_path / f"{stage}.yaml")
        text = written[0].read_text()
        assert yaml.safe_load(text)[key] == sft["output_dir"] == "outputs/sft", stage
        assert "run `alignkit init sft` and that recipe first" in text, stage
    assert (tmp_path / "data" / "dpo.jsonl").read_bytes() == (REPO / "recipes/tiny/data/dpo.jsonl").read_bytes()
    (tmp_path / "data" / "dpo.jsonl").write_text("{}\n")  # edited by the user: never replaced unasked
    with pytest.raises(ConfigError, match="dpo.jsonl exists"):
        write_recipe("kto", tmp_path / "kto2.yaml")


def test_recipes_lists_what_ships():
    text = list_recipes()
    for name in ("tiny/sft.yaml", "smollm2/dpo_qlora.yaml", "zero3_offload", "multinode_zero3.sbatch"):
        assert name in text, name
    assert len(text.splitlines()) > len(list((REPO / "recipes").glob("*/*.yaml")))


def test_launch_command_uses_a_shipped_config_and_resolves_deepspeed_json():
    assert launch_command("sft", ["--config", "x.yaml"]) is None
    command = launch_command(
        "dpo", ["--config", "x.yaml", "--accelerate_config", "zero3", "--num_processes=4", "--beta", "0.2"]
    )
    assert command[1:3] == ["-m", "accelerate.commands.launch"] and command[-6:] == [
        "-m", "alignkit.recipes.dpo", "--config", "x.yaml", "--beta", "0.2"]  # fmt: skip
    assert command[command.index("--num_processes") + 1] == "4"
    config = yaml.safe_load(Path(command[command.index("--config_file") + 1]).read_text())
    ds = Path(config["deepspeed_config"]["deepspeed_config_file"])
    assert ds.is_absolute() and ds == shipped("accelerate_configs") / "deepspeed" / "zero3.json"
    ddp = launch_command("sft", ["--num_processes", "2"])
    assert ddp[ddp.index("--config_file") + 1] == str(shipped("accelerate_configs") / "ddp.yaml")
    with pytest.raises(ConfigError, match="Did you mean 'zero3'"):
        launch_command("sft", ["--accelerate_config", "zero33"])


def test_bad_launch_flag_exits_2_without_traceback():
    done = subprocess.run(
        [sys.executable, "-m", "alignkit.cli", "sft", "--config", "x.yaml", "--accelerate_config", "nope"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and "--accelerate_config nope" in done.stderr and "Traceback" not in done.stderr


# DeepSpeed is optional (pyproject's deepspeed extra; scripts/install.sh installs it). A machine without it sees the
# install command that works (after torch, no build isolation), not accelerate's traceback ending in `pip3 install`.
# `sys.modules["deepspeed"] = None` makes it uninstalled for importlib's find_spec, as accelerate and alignkit ask.
HIDE_DEEPSPEED = "import sys; sys.modules['deepspeed'] = None\n"


@pytest.mark.parametrize("config", ["zero2", "zero3", "zero3_offload", "multinode_zero3"])
def test_deepspeed_launch_without_deepspeed_names_the_install_command(config, monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    with pytest.raises(
        ConfigError, match=rf"--accelerate_config {config} .*DS_BUILD_OPS=0 pip install --no-build-isolation"
    ):
        launch_command("sft", ["--config", "x.yaml", "--accelerate_config", config, "--num_processes", "2"])
    assert launch_command("sft", ["--config", "x.yaml", "--accelerate_config", "ddp"])  # no DeepSpeed needed


def test_deepspeed_key_without_deepspeed_exits_2_before_any_model_loads(tmp_path):
    (tmp_path / "ds.json").write_text('{"train_batch_size": "auto"}')
    code = HIDE_DEEPSPEED + (
        "from alignkit.cli import main\n"
        f"sys.exit(main(['sft', '--config', 'recipes/tiny/sft.yaml', '--deepspeed', {str(tmp_path / 'ds.json')!r}, "
        f"'--output_dir', {str(tmp_path / 'out')!r}]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "deepspeed: " in done.stderr and "DS_BUILD_OPS=0 pip install --no-build-isolation" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


def test_accelerate_launch_of_a_deepspeed_config_without_deepspeed_exits_2_with_the_fix(tmp_path):
    """`accelerate launch --config_file accelerate_configs/zero2.yaml recipes/sft.py ...` itself (launch_guard)."""
    (tmp_path / "sitecustomize.py").write_text(HIDE_DEEPSPEED)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{REPO}"}
    done = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/zero2.yaml",
         "--num_processes", "1", "recipes/sft.py", "--config", "recipes/tiny/sft.yaml",
         "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "DS_BUILD_OPS=0 pip install --no-build-isolation" in done.stderr and "Traceback" not in done.stderr
