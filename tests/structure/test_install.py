"""``pip install .`` into a fresh virtual environment outside the repo gives a working ``alignkit`` command: a stage
runs from the installed package (recipes ship as alignkit.recipes, tiny:llama resolves through its plug-in entry
point), with a recipe copied away from the checkout."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_pip_installed_alignkit_trains_a_stage(tmp_path):
    venv = tmp_path / "venv"
    # system site-packages: torch, trl and the rest are installed already, and pip may not reach an index here
    # --without-pip: the venv then runs the machine's pip and setuptools (Python 3.11's bundled setuptools 65 cannot build)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    build = tmp_path / "src"
    shutil.copytree(REPO, build, ignore=shutil.ignore_patterns(".git", "outputs", "*.egg-info", "__pycache__", "build"))
    pip = [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", str(build)]
    subprocess.run(pip, check=True, cwd=tmp_path)
    shutil.rmtree(build)  # nothing may come from a checkout

    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(REPO / "recipes" / "tiny" / "data" / "sft.jsonl", work / "train.jsonl")
    recipe = (REPO / "recipes" / "tiny" / "sft.yaml").read_text()
    recipe = recipe.replace("recipes/tiny/data/sft.jsonl", "train.jsonl")
    (work / "sft.yaml").write_text(recipe)
    where = subprocess.run(
        [str(python), "-c", "import alignkit, alignkit.recipes.sft as r; print(alignkit.__file__); print(r.__file__)"],
        cwd=work, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert all(str(venv) in path for path in where), f"not the installed package: {where}"
    # the launcher hook (alignkit/launch_guard.py) sits at the root of the venv's site-packages, where .pth files run
    assert list(venv.glob("lib/python*/site-packages/alignkit-launch.pth")), "alignkit-launch.pth was not installed"

    alignkit = venv / "bin" / "alignkit"
    done = subprocess.run(
        [str(alignkit), "sft", "--config", "sft.yaml", "--max_steps", "2", "--output_dir", "out", "--disable_tqdm", "true"],
        cwd=work, capture_output=True, text=True, env={"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(Path.home()),
                                                      "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((work / "out" / "alignkit_run.json").read_text())
    assert record["status"] == "finished" and record["stage"] == "sft" and record["format"] == 1
    assert (work / "out" / "adapter_model.safetensors").is_file()
    assert [
        e["step"] for e in json.loads((work / "out" / "trainer_state.json").read_text())["log_history"] if "loss" in e
    ] == [1, 2]

    listing = subprocess.run([str(alignkit), "--help"], capture_output=True, text=True, cwd=work)
    assert listing.returncode == 0 and all(f"  {s} " in listing.stdout for s in ("cpt", "sft", "dpo", "task", "merge"))
    bad = subprocess.run(
        [str(alignkit), "sft", "--config", "sft.yaml", "--task", "qa"], capture_output=True, text=True, cwd=work
    )
    assert bad.returncode == 2 and "unknown key 'task'" in bad.stderr and "Traceback" not in bad.stderr
