"""Beyond one machine, on loopback: two "nodes" (two ``accelerate launch --num_machines 2 --machine_rank r`` processes,
one rank each, gloo on CPU) under DeepSpeed ZeRO-3 with accelerate_configs/multinode_zero3.yaml, and ZeRO-3
checkpoints resumed at another world size (2 ranks -> 1 and 1 -> 2) through DeepSpeed's universal checkpoints.

The 2-node run shows the single-node proof's evidence (tests/distributed/test_launch.py): disjoint rows per rank,
each rank holding half of every parameter, the loss of one process with the combined batch, and a saved adapter that
reloads in one process with the gathered model's logits. Its checkpoint-2 is then resumed on 1 rank: refused as it is
(exit 2, the conversion command named), converted with that command, resumed; steps 3-4 must match the uninterrupted
run. The other way, a 1-rank run's checkpoint-2 resumes on 2 nodes.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, log_history, run_recipe, train_losses

from alignkit.train.distributed import DEBUG_ENV, PROBE_IDS

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.distributed

STEPS, SAVE_AT, BATCH = 4, 2, 2  # 2 ranks x 2 rows = 4 rows per step, like 1 process x 4
COMMON = [
    "--config", "recipes/tiny/sft.yaml", "--load_in_4bit", "false", "--lora_dropout", "0", "--test_size", "0",
    "--gradient_checkpointing", "false", "--max_steps", str(STEPS), "--save_steps", str(SAVE_AT),
    "--lr_scheduler_type", "linear", "--disable_tqdm", "true",
]  # fmt: skip
# Measured on 2 CPU cores: the per-step losses of 2 ranks x 2 and 1 process x 4 differ by < 2e-6, and a resume at the
# other world size continues the uninterrupted run to 5e-7; one step changes the loss by > 0.02, 200 x the tolerance.
LOSS_ATOL = 1e-4
TIMEOUT = 300  # seconds for one launch, all its processes together


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    # The ranks import this checkout's alignkit, whichever copy pip's editable install points at.
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, DEBUG_ENV: "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "PYTHONWARNINGS": "ignore"}


def _launch(
    config: Path, argv: list[str], log: Path, machines: int = 1, processes: int = 1, exit_code: int = 0
) -> list[str]:
    """``accelerate launch`` recipes/sft.py: one launcher per machine (all on 127.0.0.1, machine_rank 0..n-1, a free
    port), each with ``processes // machines`` ranks. Returns each launcher's output, machine 0 first."""
    port = _free_port()
    cmds = [
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
         "--num_machines", str(machines), "--num_processes", str(processes), "--machine_rank", str(rank),
         "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "recipes/sft.py", *argv]
        for rank in range(machines)
    ]  # fmt: skip
    return _run_together(cmds, [log.with_suffix(f".node{r}.log") for r in range(machines)], _env(), exit_code)


def _run_together(cmds: list[list[str]], logs: list[Path], env: dict[str, str], exit_code: int = 0) -> list[str]:
    """Start every command at once, each in its own session, and wait at most TIMEOUT for all. When one fails or time
    runs out, every one is killed with all it started (a rank left alone would wait for the others until gloo's
    timeout). Fails the test unless every one exits with ``exit_code``; returns each command's output."""
    procs = []
    for cmd, log in zip(cmds, logs):
        with open(log, "w") as out:  # the child keeps its own copy of the descriptor
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True))  # fmt: skip
    deadline = time.monotonic() + TIMEOUT
    while any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, exit_code) for p in procs) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)  # its session: the launcher and the ranks it started
            p.wait()
    texts = [log.read_text() for log in logs]
    codes = [p.returncode for p in procs]
    assert codes == [exit_code] * len(procs), f"exit codes {codes} (timeout {TIMEOUT}s)\n" + "\n".join(
        t[-4000:] for t in texts
    )
    return texts


def _zero3_configs(tmp: Path) -> dict[str, Path]:
    """The shipped multi-node and single-node ZeRO-3 configs with stage3_param_persistence_threshold 0 (by default
    the tiny model's LoRA matrices would stay whole on every rank, and their partitioning go unproven)."""
    ds = json.loads((REPO / "accelerate_configs/deepspeed/zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp / "zero3.json").write_text(json.dumps(ds))
    configs = {}
    for name in ("multinode_zero3", "zero3"):
        launcher = yaml.safe_load((REPO / f"accelerate_configs/{name}.yaml").read_text())
        launcher["deepspeed_config"]["deepspeed_config_file"] = str(tmp / "zero3.json")
        (tmp / f"{name}.yaml").write_text(yaml.safe_dump(launcher))
        configs[name] = tmp / f"{name}.yaml"
    return configs


def _trajectory(output_dir: Path) -> list[tuple[int, float, float]]:
    return [(e["step"], e["loss"], e["learning_rate"]) for e in log_history(output_dir) if "loss" in e]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 2-node ZeRO-3 run and the one-process reference with the combined batch (4 rows per step)."""
    tmp = tmp_path_factory.mktemp("multinode")
    configs = _zero3_configs(tmp)
    nodes = tmp / "nodes"
    texts = _launch(configs["multinode_zero3"], [*COMMON, "--per_device_train_batch_size", str(BATCH),
                   "--output_dir", str(nodes)], tmp / "nodes", machines=2, processes=2)  # fmt: skip
    single = tmp / "single"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(DEBUG_ENV, "1")
        mp.chdir(REPO)
        run_recipe("sft", [*COMMON, "--per_device_train_batch_size", str(2 * BATCH), "--output_dir", str(single)])
    return {"configs": configs, "nodes": nodes, "nodes_logs": texts, "single": single, "tmp": tmp}


def _debug(out: Path, ranks: int) -> list[dict]:
    return [json.loads((out / f"distributed_debug_rank{r}.json").read_text()) for r in range(ranks)]


def test_two_nodes_train_disjoint_rows_that_together_are_one_process_rows(runs):
    ranks = _debug(runs["nodes"], 2)
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    rows = [r["rows"] for r in ranks]
    assert all(len(seen) == STEPS * BATCH for seen in rows), [len(seen) for seen in rows]
    assert not set(rows[0]) & set(rows[1]), "both nodes trained on the same rows"
    assert sorted(rows[0] + rows[1]) == sorted(_debug(runs["single"], 1)[0]["rows"])


def test_two_nodes_loss_matches_one_process_with_the_combined_batch(runs):
    nodes, single = train_losses(runs["nodes"]), train_losses(runs["single"])
    print(f"2 nodes x 1 rank: losses {nodes}\n1 process x 4 rows: losses {single}")
    assert len(nodes) == len(single) == STEPS
    assert nodes == pytest.approx(single, abs=LOSS_ATOL, rel=0)
    assert nodes[-1] < nodes[0]


def test_two_nodes_each_hold_half_of_every_parameter(runs):
    for rank in _debug(runs["nodes"], 2):
        print(f"node {rank['rank']}: " + ", ".join(f"{k} {v}" for k, v in rank.items() if k.startswith("zero3")))
        assert rank["zero3_numel"] / 2 <= rank["zero3_local_numel"] < rank["zero3_numel"] / 2 + 1000
        assert rank["zero3_trainable_local_numel"] == pytest.approx(rank["zero3_trainable_numel"] / 2, abs=100)
        assert rank["zero3_materialised_numel"] == 0


def test_two_nodes_adapter_reloads_in_one_process_with_the_gathered_logits(runs):
    from peft import PeftModel
    from safetensors.torch import load_file

    from alignkit.config import ModelArguments, QuantizationArguments
    from alignkit.models.loader import load_base_model

    out = runs["nodes"]
    gathered = load_file(str(out / "distributed_debug_logits.safetensors"))["logits"]
    base = load_base_model(ModelArguments(model_name_or_path="tiny:llama"), QuantizationArguments(load_in_4bit=False))
    probe = torch.tensor([PROBE_IDS])
    with torch.no_grad():
        base_logits = base(input_ids=probe).logits
        logits = PeftModel.from_pretrained(base, str(out)).eval()(input_ids=probe).logits
    assert (logits - base_logits).abs().max() > 1e-3, "the saved adapter does not change the model"
    torch.testing.assert_close(logits, gathered, atol=1e-5, rtol=0)


def test_launch_facts_printed_once_and_output_dir_checked_on_every_node(runs):
    lines = [line for text in runs["nodes_logs"] for line in text.splitlines() if "alignkit: launch: " in line]
    assert len(lines) == 1, lines  # rank 0 only
    assert "world size 2 (2 machines x 1 process), DeepSpeed ZeRO-3" in lines[0]
    assert "effective batch 4 rows per optimizer step = 2 ranks x per_device_train_batch_size 2" in lines[0]
    checked = [line for text in runs["nodes_logs"] for line in text.splitlines() if "run id checked" in line]
    assert len(checked) == 1 and "the same folder on all 2 ranks" in checked[0], checked
    assert not (runs["nodes"] / ".alignkit_run_id").exists()  # written by rank 0, read by both, removed


def _preempted_copy(run: Path, dest: Path) -> Path:
    """``run`` as a job preempted after its checkpoint-SAVE_AT: that checkpoint and the run's files, no later ones."""
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns(f"checkpoint-{STEPS}"))
    return dest


def _convert(checkpoint: Path, refusal: str) -> None:
    """Run the conversion command the refusal named (DeepSpeed's ds_to_universal)."""
    command = re.search(r"(python -m deepspeed\.checkpoint\.ds_to_universal [^,]+),", refusal).group(1)
    assert str(checkpoint) in command
    argv = shlex.split(command)
    done = subprocess.run([sys.executable, *argv[1:]], cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (checkpoint / "latest_universal").is_file()


def _assert_resumed_continues(resumed: Path, logs: list[str], uninterrupted: list, what: str) -> None:
    got = _trajectory(resumed)
    print(f"{what}: resumed {got[SAVE_AT:]} vs uninterrupted {uninterrupted[SAVE_AT:]}")
    # rank 0 logged steps 3-4 only: resumed, not trained again from the start
    assert len(re.findall(r"\{'loss': ", logs[0])) == STEPS - SAVE_AT, logs[0][-3000:]
    assert [g[0] for g in got] == [w[0] for w in uninterrupted] == list(range(1, STEPS + 1))
    for (step, loss, lr), (_, want, want_lr) in zip(got[SAVE_AT:], uninterrupted[SAVE_AT:]):
        assert abs(loss - want) <= LOSS_ATOL, f"{what}, step {step}: loss {loss} resumed, {want} uninterrupted"
        assert lr == pytest.approx(want_lr, rel=1e-9), f"{what}, step {step}: learning rate {lr} vs {want_lr}"
    steps_apart = [abs(a[1] - b[1]) for a, b in zip(uninterrupted, uninterrupted[1:])]
    assert min(steps_apart) > 100 * LOSS_ATOL  # the tolerance tells one step's weights from the next's


def test_zero3_checkpoint_of_two_nodes_resumes_on_one_rank(runs, tmp_path):
    """Preempted after checkpoint-2 on 2 nodes, resumed on 1 rank with 4 rows per device (the same 4 rows a step)."""
    uninterrupted = _trajectory(runs["nodes"])
    out = _preempted_copy(runs["nodes"], tmp_path / "run")
    checkpoint = out / f"checkpoint-{SAVE_AT}"
    manifest = json.loads((checkpoint / "alignkit_checkpoint.json").read_text())
    assert (manifest["world_size"], manifest["train_batch_size"]) == (2, 4)
    resume = [*COMMON, "--output_dir", str(out), "--resume_from_checkpoint", "true"]

    # another split of the rows per step would not continue the run: refused before anything loads
    from alignkit.errors import ConfigError

    with pytest.raises(ConfigError, match=r"trained with 4 rows per step on 2 ranks.*--per_device_train_batch_size 4"):
        run_recipe("sft", [*resume, "--per_device_train_batch_size", str(BATCH)])

    # as it is, the ZeRO-3 checkpoint loads only on 2 ranks: refused through accelerate launch, exit 2, one message
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(runs["configs"]["zero3"]),
           "--num_processes", "1", "--main_process_port", str(_free_port()), "recipes/sft.py", *resume,
           "--per_device_train_batch_size", str(2 * BATCH)]  # fmt: skip
    refused = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-4000:]
    assert "Traceback" not in refused.stderr and refused.stderr.count("alignkit: ConfigError") == 1
    assert "written by 2 ranks, and this launch has 1" in refused.stderr

    _convert(checkpoint, refused.stderr)
    log = _launch(
        runs["configs"]["zero3"], [*resume, "--per_device_train_batch_size", str(2 * BATCH)], tmp_path / "one"
    )
    _assert_resumed_continues(out, log, uninterrupted, "2 nodes -> 1 rank")
    # and on the rows the 2 nodes trained in steps 3-4: the data position carried over to the new split
    later = [row for rank in _debug(runs["nodes"], 2) for row in rank["rows"][SAVE_AT * BATCH :]]
    assert sorted(_debug(out, 1)[0]["rows"]) == sorted(later)
    assert json.loads((out / f"checkpoint-{STEPS}" / "alignkit_checkpoint.json").read_text())["world_size"] == 1


def test_zero3_checkpoint_of_one_rank_resumes_on_two_nodes(runs, tmp_path):
    one = tmp_path / "one"
    _launch(runs["configs"]["zero3"], [*COMMON, "--per_device_train_batch_size", str(2 * BATCH), "--output_dir",
            str(one)], tmp_path / "one")  # fmt: skip
    uninterrupted = _trajectory(one)
    out = _preempted_copy(one, tmp_path / "run")
    checkpoint = out / f"checkpoint-{SAVE_AT}"
    resume = [*COMMON, "--output_dir", str(out), "--resume_from_checkpoint", "true"]
    # as it is: refused on both nodes (each launcher exits 2), the message once (global rank 0), no traceback
    refused = _launch(runs["configs"]["multinode_zero3"], [*resume, "--per_device_train_batch_size", str(BATCH)],
                      tmp_path / "refused", machines=2, processes=2, exit_code=2)  # fmt: skip
    assert "".join(refused).count("alignkit: ConfigError") == 1 and "Traceback" not in "".join(refused)
    assert "written by 1 rank, and this launch has 2" in refused[0]
    _convert(checkpoint, refused[0])
    log = _launch(runs["configs"]["multinode_zero3"], [*resume, "--per_device_train_batch_size", str(BATCH)],
                  tmp_path / "nodes", machines=2, processes=2)  # fmt: skip
    _assert_resumed_continues(out, log, uninterrupted, "1 rank -> 2 nodes")
    ranks = _debug(out, 2)  # steps 3-4 split over both nodes: together the rows the one rank trained in them
    assert all(len(r["rows"]) == (STEPS - SAVE_AT) * BATCH for r in ranks)
    assert not set(ranks[0]["rows"]) & set(ranks[1]["rows"])
    later = _debug(one, 1)[0]["rows"][SAVE_AT * 2 * BATCH :]
    assert sorted(ranks[0]["rows"] + ranks[1]["rows"]) == sorted(later)


_CHECK_SHARED = """
import sys
from pathlib import Path
import torch.distributed as dist
from alignkit.errors import PreflightError
from alignkit.train.output_folder import check_shared_output_dir
rank, shared, own = int(sys.argv[1]), Path(sys.argv[3]), Path(sys.argv[4 + int(sys.argv[1])])
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2], rank=rank, world_size=2)
check_shared_output_dir(shared)
print("shared: passed")
try:
    check_shared_output_dir(own)
except PreflightError as exc:
    print(exc)
    sys.exit(2)
"""


def test_nodes_must_see_the_same_output_dir(tmp_path):
    """Two gloo ranks check their output_dir: the same folder passes; a folder of each node's own (what a path on a
    local disk is on a real cluster) is refused on both ranks, naming the rank that does not see rank 0's run id."""
    dirs = [tmp_path / "shared", tmp_path / "node0", tmp_path / "node1"]
    for d in dirs:
        d.mkdir()
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-c", _CHECK_SHARED, str(r), port, *map(str, dirs)], cwd=REPO,
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]  # fmt: skip
    try:
        results = [p.communicate(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [2, 2], results
    assert not (dirs[0] / ".alignkit_run_id").exists()  # the shared check cleaned up after itself
    for stdout, _ in results:
        assert stdout.startswith("shared: passed")
        assert "not the same folder on every node" in stdout and "rank 1 on" in stdout and "no such file" in stdout
        assert "Fix: put output_dir on storage every node mounts at the same path" in stdout


# The scheduler's side of scripts/slurm/multinode_zero3.sbatch, for one host: srun (--ntasks-per-node=1) runs the
# job step's command once per node, each with its SLURM_NODEID; scontrol lists the allocation's hosts.
FAKE_SLURM = {
    "srun": """#!/usr/bin/env bash
while [[ $1 == --* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do SLURM_NODEID=$node "$@" & pids+=($!); done
rc=0; for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done; exit $rc
""",
    "scontrol": """#!/usr/bin/env bash
tr , '\\n' <<< "$3"
""",
}


def test_slurm_script_runs_two_nodes_and_resumes_when_requeued(tmp_path):
    """The shipped sbatch script, with srun/scontrol standing in for SLURM on one host (2 nodes, 1 rank each):
    machine_rank comes from SLURM_NODEID and the rendezvous from the first host; requeued after a preemption (here:
    its last checkpoint gone), the same script resumes from the newest checkpoint left."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in FAKE_SLURM.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    out = tmp_path / "out"
    env = {
        **_env(), "PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]]),
        "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "127.0.0.1,127.0.0.1", "GPUS_PER_NODE": "1",
        "OUTPUT_DIR": str(out), "STAGE": "sft", "RECIPE": "recipes/tiny/sft.yaml",
    }  # fmt: skip
    argv = ["--load_in_4bit", "false", "--test_size", "0", "--max_steps", "2", "--save_steps", "1",
            "--per_device_train_batch_size", "2", "--disable_tqdm", "true"]  # fmt: skip
    job = ["bash", "scripts/slurm/multinode_zero3.sbatch", *argv]
    (text,) = _run_together([job], [tmp_path / "job.log"], {**env, "MAIN_PROCESS_PORT": str(_free_port())})
    assert "world size 2 (2 machines x 1 process)" in text
    ranks = _debug(out, 2)
    assert [r["world_size"] for r in ranks] == [2, 2] and not set(ranks[0]["rows"]) & set(ranks[1]["rows"])
    assert len(ranks[0]["rows"]) == 2 * 2

    shutil.rmtree(out / "checkpoint-2")  # preempted after checkpoint-1
    (text,) = _run_together([job], [tmp_path / "requeued.log"], {**env, "MAIN_PROCESS_PORT": str(_free_port())})
    # each node's first rank prints the logs: step 2's only (epoch 0.125 at 4 rows of 64), not step 1's
    assert set(re.findall(r"\{'loss': .*'epoch': '([\d.]+)'\}", text)) == {"0.125"}
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    assert all(len(r["rows"]) == 2 for r in _debug(out, 2))  # the requeued job trained one step of 2 rows a rank
