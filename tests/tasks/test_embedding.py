"""The embed stage (recipes/embed.py) on the tiny BERT, 4-bit QLoRA and full precision: the contrastive loss falls,
held-out recall@1 rises, the saved folder loads with plain ``SentenceTransformer(path)`` and gives the embeddings of
the model alignkit trained; bad rows and a loss that does not fit the data stop the run before step 1."""

import json

import pytest
from conftest import run_recipe, train_losses, write_jsonl

from alignkit.errors import ConfigError, DataError
from alignkit.runs import RunRecord
from alignkit.testing.synthetic import embed_rows, embed_scored_rows

RECALL = "heldout_cosine_recall@1"
PRECISIONS = {
    "4bit": ["--load_in_4bit", "true", "--use_peft", "true"],
    "full": ["--load_in_4bit", "false", "--use_peft", "false", "--learning_rate", "1e-3"],
}


def _mean(values):
    return sum(values) / len(values)


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_embed_trains_recall_rises_and_the_saved_folder_loads_plainly(tmp_path, precision):
    from sentence_transformers import SentenceTransformer

    from alignkit.config.args import ModelArguments
    from alignkit.export.merge_embedding import embed
    from alignkit.models import load_model
    from alignkit.tasks.embedding import sentence_transformer

    out = tmp_path / f"embed-{precision}"
    metrics = run_recipe("embed", ["--config", "recipes/tiny/embed.yaml", "--output_dir", str(out),
                                   *PRECISIONS[precision]])  # fmt: skip
    losses = train_losses(out)
    assert _mean(losses[-5:]) < _mean(losses[:5]) - 0.3, losses
    assert metrics[f"eval_{RECALL}"] > metrics[f"before_{RECALL}"], metrics
    for key in ("heldout_cosine_mrr@10", "heldout_cosine_ndcg@10", "heldout_cosine_recall@10"):
        assert 0 <= metrics[f"before_{key}"] <= 1 and 0 <= metrics[f"eval_{key}"] <= 1
    record = RunRecord.read(out)
    assert record.metrics[f"before_{RECALL}"] == metrics[f"before_{RECALL}"]
    assert record.last.task == "embedding" and record.last.head_config["pooling"].startswith("mean pooling")
    # saved (merged for LoRA) vs the model in memory at the end of training, float32 on both sides
    assert record.metrics["saved_vs_trained_max_abs_diff"] < 1e-4
    folder = out if precision == "full" else out.with_name(out.name + "-merged")
    assert not (folder / "adapter_config.json").exists()
    plain = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
    # the same folder through alignkit's loader (a run output: a plain model with a lineage) and wrapper
    ours = sentence_transformer(load_model(ModelArguments(model_name_or_path=str(folder)), task="embedding"), folder)
    assert (embed(plain) - embed(ours)).abs().max().item() < 1e-5
    assert "Sentence embeddings" in (folder / "README.md").read_text()


def test_alignkit_merge_writes_a_sentence_transformer_folder(tmp_path):
    """`alignkit merge` on an embed adapter output (merge_after_training off; a full-precision LoRA run here, the
    4-bit test above merges by dequantizing): parity-gated, pushable."""
    from sentence_transformers import SentenceTransformer

    from alignkit.cli import main as cli
    from alignkit.export.hub import files_to_push

    out = tmp_path / "embed"
    run_recipe("embed", ["--config", "recipes/tiny/embed.yaml", "--output_dir", str(out), "--max_steps", "4",
                         "--merge_after_training", "false", "--load_in_4bit", "false"])  # fmt: skip
    assert (out / "adapter_config.json").is_file() and not out.with_name("embed-merged").exists()
    assert "1_Pooling/config.json" in files_to_push(out)  # the adapter output pushes with its modules
    assert cli(["merge", str(out), "--output", str(tmp_path / "merged")]) == 0
    merged = RunRecord.read(tmp_path / "merged")
    assert merged.merge.method == "full_precision" and merged.merge.parity_passed
    assert merged.merge.max_abs_logit_diff < 1e-4
    model = SentenceTransformer(str(tmp_path / "merged"), device="cpu", local_files_only=True)
    assert model.encode(["a question"]).shape == (1, 64)
    pushed = files_to_push(tmp_path / "merged")
    assert {"modules.json", "1_Pooling/config.json", "model.safetensors", "alignkit_run.json"} <= set(pushed)


def _refused(tmp_path, rows, *extra):
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "out"
    argv = ["--config", "recipes/tiny/embed.yaml", "--datasets", f"[{data}]", "--output_dir", str(out), *extra]
    with pytest.raises((DataError, ConfigError)) as info:
        run_recipe("embed", argv)
    assert not (out / "alignkit_run.json").exists(), "the error must come before training starts"
    return info.value, str(data)


def test_bad_rows_are_refused_with_file_row_and_fix(tmp_path):
    rows = embed_rows(4)
    rows[2] = {**rows[2], "anchor": "  "}
    error, path = _refused(tmp_path, rows)
    assert isinstance(error, DataError) and (error.source, error.row) == (path, 3)
    assert "'anchor' is empty" in error.problem and "non-empty 'anchor'" in error.fix

    scored = embed_scored_rows(8)
    scored[1] = {**scored[1], "score": 4.2}
    error, path = _refused(tmp_path, scored)
    assert (error.source, error.row) == (path, 2) and "4.2" in error.problem and "[0, 1]" in error.fix

    error, path = _refused(tmp_path, [{"anchor": r["anchor"]} for r in rows])  # no positive
    assert error.source == path and "missing columns for embed" in error.problem and "'positive'" in error.fix


def test_a_loss_that_does_not_fit_the_format_is_a_config_error(tmp_path):
    error, _ = _refused(tmp_path, embed_rows(4), "--loss", "cosent")
    assert isinstance(error, ConfigError) and "CoSENTLoss" in str(error) and "mnrl" in str(error)
    error, _ = _refused(tmp_path, embed_scored_rows(8), "--loss", "mnrl")
    assert "cosent" in str(error)


def test_scored_pairs_train_with_cosent_and_report_spearman(tmp_path):
    out = tmp_path / "sts"
    data = write_jsonl(tmp_path / "sts.jsonl", embed_scored_rows(300))
    metrics = run_recipe("embed", ["--config", "recipes/tiny/embed.yaml", "--datasets", f"[{data}]",
                                   "--output_dir", str(out), "--max_steps", "20", "--load_in_4bit", "false", "--use_peft", "false",
                                   "--learning_rate", "1e-3"])  # fmt: skip
    assert RunRecord.read(out).last.head_config["loss"] == "CoSENTLoss"
    assert metrics["eval_heldout_spearman_cosine"] > metrics["before_heldout_spearman_cosine"], metrics
    assert json.loads((out / "modules.json").read_text())[1]["path"] == "1_Pooling"


def test_bad_rows_exit_2_without_a_traceback_from_the_command_line(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    scored = embed_scored_rows(8)
    scored[4] = {**scored[4], "score": -0.5}
    data = write_jsonl(tmp_path / "bad.jsonl", scored)
    done = subprocess.run(
        [sys.executable, "recipes/embed.py", "--config", "recipes/tiny/embed.yaml", "--datasets", f"[{data}]",
         "--output_dir", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"{data}" in done.stderr and "row 5" in done.stderr and "[0, 1]" in done.stderr
    assert "Traceback" not in done.stderr
