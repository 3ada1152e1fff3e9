"""CPT on a streamed corpus (issue 19, ``streaming: true``): a multi-shard corpus larger than the memory budget trains
5 steps of the tiny Llama with peak RSS that does not grow with the corpus, nothing written to the datasets cache,
and the run record and model card describing the shards; a resumed streamed run continues exactly where it
stopped; a streamed recipe without max_steps exits 2 with the fix before anything loads."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, TINY_DATA, run_recipe, train_losses

from alignkit.errors import run_cli

TINY = ["--config", "recipes/tiny/cpt.yaml", "--test_size", "0", "--disable_tqdm", "true"]
SHARDS = 4
SHARD_BYTES = 80 * 2**20  # 4 x 80 MiB: a 320 MiB corpus
# The child's peak RSS (its own ru_maxrss, after training): imports, model and trainer cost the same for any corpus
CHILD = """
import json, resource, runpy, sys
runpy.run_path("recipes/cpt.py", run_name="alignkit_recipe")["main"](sys.argv[1:])
print(json.dumps({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def _corpus(folder, shard_bytes: int) -> tuple[str, int]:
    """SHARDS JSON-lines shards of the tiny CPT text repeated to ``shard_bytes`` each; (glob, bytes on disk)."""
    folder.mkdir(parents=True)
    text = (TINY_DATA / "cpt.jsonl").read_text()
    chunk = text * max(1, min(200, shard_bytes // len(text)))
    for i in range(SHARDS):
        with open(folder / f"part-{i:03d}.jsonl", "w") as f:
            written = 0
            while not written or written < shard_bytes:
                f.write(chunk)
                written += len(chunk)
    return str(folder / "part-*.jsonl"), sum(p.stat().st_size for p in folder.iterdir())


def _train_in_child(pattern: str, out, cache) -> int:
    argv = [*TINY, "--datasets", f"{{path: '{pattern}', streaming: true}}", "--max_steps", "5", "--save_steps", "5",
            "--output_dir", str(out)]  # fmt: skip
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_bytes"]


def test_streamed_cpt_trains_on_a_corpus_larger_than_its_memory_budget(tmp_path):
    small, _ = _corpus(tmp_path / "small", 0)  # one copy of the text per shard
    big, corpus_bytes = _corpus(tmp_path / "big", SHARD_BYTES)
    try:
        baseline = _train_in_child(small, tmp_path / "out_small", tmp_path / "cache")
        peak = _train_in_child(big, tmp_path / "out", tmp_path / "cache")
    finally:
        shutil.rmtree(tmp_path / "big")  # 320 MiB: not left behind in pytest's kept tmp folders
    growth = peak - baseline
    print(f"corpus {corpus_bytes / 2**20:.0f} MiB; peak RSS {baseline / 2**20:.0f} MiB (small corpus) -> "
          f"{peak / 2**20:.0f} MiB (big corpus): growth {growth / 2**20:.1f} MiB")  # fmt: skip
    assert growth < corpus_bytes / 3, (
        f"peak RSS grew {growth / 2**20:.0f} MiB for a {corpus_bytes / 2**20:.0f} MiB corpus"
    )
    out = tmp_path / "out"
    losses = train_losses(out)
    assert len(losses) == 5 and all(math.isfinite(x) for x in losses), losses
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 5
    assert (out / "adapter_model.safetensors").is_file()
    cached = [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    assert not cached, f"streaming wrote to the datasets cache: {cached}"
    record = json.loads((out / "alignkit_run.json").read_text())
    assert record["status"] == "finished"
    assert record["lineage"][-1]["datasets"] == [
        {"path": big, "weight": 1.0, "split": "train", "name": "big/part-*.jsonl", "streaming": True,
         "files": SHARDS, "bytes": corpus_bytes}
    ]  # fmt: skip
    assert "`big/part-*.jsonl` (x1.0, 4 files, streamed)" in (out / "README.md").read_text()


def test_a_resumed_streamed_run_continues_where_it_stopped(tmp_path):
    pattern, _ = _corpus(tmp_path / "corpus", 0)
    argv = [*TINY, "--datasets", f"{{path: '{pattern}', streaming: true}}", "--save_steps", "3"]
    run_recipe("cpt", [*argv, "--max_steps", "5", "--output_dir", str(tmp_path / "whole")])
    run_recipe("cpt", [*argv, "--max_steps", "3", "--output_dir", str(tmp_path / "resumed")])
    run_recipe(
        "cpt",
        [*argv, "--max_steps", "5", "--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint", "true"],
    )
    whole, resumed = train_losses(tmp_path / "whole"), train_losses(tmp_path / "resumed")
    assert len(whole) == len(resumed) == 5
    assert resumed == pytest.approx(whole, abs=1e-5), "the resumed stream did not continue from its position"


def test_a_streamed_recipe_without_max_steps_exits_2_with_the_fix(tmp_path, capsys):
    pattern, _ = _corpus(tmp_path / "corpus", 0)
    main = lambda argv: run_recipe("cpt", argv)  # noqa: E731
    argv = [*TINY, "--datasets", f"{{path: '{pattern}', streaming: true}}", "--max_steps", "-1",
            "--output_dir", str(tmp_path / "out")]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        run_cli(main, argv)
    assert exit_.value.code == 2 and not (tmp_path / "out").exists()
    err = capsys.readouterr().err
    assert "ConfigError: datasets[" in err and "a stream has no length" in err and "Fix: set max_steps" in err
