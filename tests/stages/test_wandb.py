"""`report_to: wandb` in offline mode records the training loss curve and alignkit's resolved config; both are read
back from the run's .wandb file with alignkit.tracking (no W&B service, no network)."""

import pytest
from conftest import run_recipe, train_losses

from alignkit.tracking import WandbFileError, metric_curve, read_config, read_history, run_file


def test_offline_wandb_run_records_the_loss_history(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    (tmp_path / "wb").mkdir()
    out = tmp_path / "out"
    argv = ["--config", "recipes/tiny/cpt.yaml", "--test_size", "0", "--disable_tqdm", "true", "--max_steps", "4"]
    run_recipe("cpt", [*argv, "--report_to", "wandb", "--output_dir", str(out)])

    path = run_file(tmp_path / "wb")  # wb/wandb/offline-run-<time>-<id>/run-<id>.wandb
    assert path.parent.name.startswith("offline-run-")
    curve = metric_curve(path, "train/loss")
    assert [step for step, _ in curve] == [1, 2, 3, 4]
    assert [loss for _, loss in curve] == pytest.approx(train_losses(out), rel=1e-6)
    assert all("train/grad_norm" in row for row in read_history(path) if "train/loss" in row)
    config = read_config(path)
    assert (
        config["alignkit"]["ModelArguments"]["model_name_or_path"] == "tiny:llama"
    )  # alignkit's groups, not only trl's
    assert config["run_name"] == "cpt-out" and config["max_steps"] == 4


def test_reader_rejects_what_is_not_a_wandb_file(tmp_path):
    bad = tmp_path / "run-x.wandb"
    bad.write_bytes(b"not a run")
    with pytest.raises(WandbFileError, match="not a W&B run file"):
        read_history(bad)
