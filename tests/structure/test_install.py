"""The wheel, built from the clone and installed into a fresh virtual environment outside the repo, gives a working
``alignkit`` command with nothing from a checkout: it carries the recipes, accelerate configs, SLURM script and sample
data; ``alignkit init sft`` writes a recipe that ``alignkit sft`` trains (recipes ship as alignkit.recipes, tiny:llama
resolves through its plug-in entry point), in one process and under ``--accelerate_config ddp --num_processes 2``."""

import json
import shutil
import subprocess
import sys
import zipfile
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
    wheel = [str(python), "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", "dist"]
    subprocess.run([*wheel, str(build)], check=True, cwd=tmp_path)
    shutil.rmtree(build)  # nothing may come from a checkout
    (whl,) = (tmp_path / "dist").glob("alignkit-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    shipped = {
        "alignkit/recipes/tiny/sft.yaml", "alignkit/recipes/smollm2/dpo_qlora.yaml", "alignkit/recipes/tiny/data/sft.jsonl",
        "alignkit/recipes/tiny/data/tasks/ner.jsonl", "alignkit/accelerate_configs/ddp.yaml",
        "alignkit/accelerate_configs/zero3.yaml", "alignkit/accelerate_configs/deepspeed/zero3.json",
        "alignkit/slurm/multinode_zero3.sbatch", "alignkit/config/keys.json", "alignkit-launch.pth",
    }  # fmt: skip
    assert shipped <= names, f"missing from the wheel: {sorted(shipped - names)}"
    assert len([n for n in names if n.startswith("alignkit/recipes/") and n.endswith(".yaml")]) == len(
        list((REPO / "recipes").glob("*/*.yaml"))
    )
    assert "alignkit/recipes/tiny/data/tasks/qa_large.jsonl" not in names  # one slow test's data stays in the clone
    pip = [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", str(whl)]
    subprocess.run(pip, check=True, cwd=tmp_path)

    work = tmp_path / "work"
    work.mkdir()
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(Path.home()), "HF_HUB_OFFLINE": "1",
           "WANDB_MODE": "offline"}  # fmt: skip
    alignkit = venv / "bin" / "alignkit"
    init = subprocess.run([str(alignkit), "init", "sft", "--model", "tiny:llama"], cwd=work, capture_output=True,
                          text=True, env=env)  # fmt: skip
    assert init.returncode == 0, init.stderr[-3000:]
    assert (work / "sft.yaml").is_file() and (work / "data" / "sft.jsonl").is_file()
    listing = subprocess.run([str(alignkit), "recipes"], cwd=work, capture_output=True, text=True, env=env)
    assert listing.returncode == 0 and "tiny/sft.yaml" in listing.stdout and str(venv) in listing.stdout
    where = subprocess.run(
        [str(python), "-c", "import alignkit, alignkit.recipes.sft as r; print(alignkit.__file__); print(r.__file__)"],
        cwd=work, capture_output=True, text=True, check=True, env=env,
    ).stdout.split()  # fmt: skip
    assert all(str(venv) in path for path in where), f"not the installed package: {where}"
    # the launcher hook (alignkit/launch_guard.py) sits at the root of the venv's site-packages, where .pth files run
    assert list(venv.glob("lib/python*/site-packages/alignkit-launch.pth")), "alignkit-launch.pth was not installed"

    done = subprocess.run(
        [str(alignkit), "sft", "--config", "sft.yaml", "--max_steps", "2", "--output_dir", "out", "--disable_tqdm", "true"],
        cwd=work, capture_output=True, text=True, env=env,
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

    ddp = subprocess.run(
        [str(alignkit), "sft", "--config", "sft.yaml", "--max_steps", "2", "--output_dir", "out-ddp", "--disable_tqdm",
         "true", "--accelerate_config", "ddp", "--num_processes", "2"],
        cwd=work, capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert f"--config_file {venv}" in ddp.stderr  # the packaged config, not a checkout's
    assert "world size 2 (1 machine x 2 processes), DDP" in ddp.stdout
    record = json.loads((work / "out-ddp" / "alignkit_run.json").read_text())
    assert record["status"] == "finished"
