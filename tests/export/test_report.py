"""alignkit report: PNGs and one HTML page from finished tiny SFT and DPO runs; what is plotted equals the trainer
state's log history; several runs overlay. W&B: each stage's run is named and grouped by stage, carries alignkit's
resolved config and the DPO metrics."""

import json

import matplotlib.image
from conftest import log_history

from alignkit.cli import main as cli
from alignkit.export.report import PLOTS, write_report
from alignkit.tracking import read_records, run_file

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _expected(history, key):
    points = [(e["step"], e[key]) for e in history if key in e]
    return [s for s, _ in points], [v for _, v in points]


def test_report_plots_the_trainer_state_of_sft_and_dpo(chain, tmp_path):
    report = write_report([chain.sft, chain.dpo], tmp_path / "report")

    # DPO adds rewards, margins, accuracy to loss, learning rate, grad norm; a plot no run logs a key of is not drawn
    assert set(report.pngs) == {"loss", "learning_rate", "grad_norm", "rewards", "margins", "accuracy"}
    for png in report.pngs.values():
        assert png.read_bytes().startswith(PNG_MAGIC) and matplotlib.image.imread(png).shape[2] in (3, 4)
    runs = {"sft:sft": log_history(chain.sft), "dpo:dpo": log_history(chain.dpo)}
    for plot, (_, keys) in ((p, PLOTS[p]) for p in report.pngs):
        for run, history in runs.items():
            drawn = report.series[plot].get(run, {})
            expected = {k: _expected(history, k) for k in keys if _expected(history, k)[0]}
            assert drawn.keys() == expected.keys(), (plot, run)
            for key, (steps, values) in expected.items():
                assert drawn[key] == (steps, values), (plot, run, key)
    assert (
        report.series["loss"]["sft:sft"]["eval_loss"][1][-1]
        == json.loads((chain.sft / "alignkit_run.json").read_text())["metrics"]["eval_loss"]
    )
    assert "rewards/chosen" in report.series["rewards"]["dpo:dpo"] and "sft:sft" not in report.series["rewards"]

    page = report.html.read_text()
    assert page.count("<img") == len(report.pngs) and "sft:sft" in page and "dpo:dpo" in page


def test_report_cli_defaults_to_the_run_folder(chain):
    assert cli(["report", str(chain.sft)]) == 0
    assert sorted(p.name for p in (chain.sft / "report").iterdir()) == [
        "grad_norm.png",
        "learning_rate.png",
        "loss.png",
        "report.html",
    ]
    assert cli(["report", str(chain.sft / "nope")]) == 2  # a clear error, no traceback: bad input


def test_wandb_runs_are_named_and_grouped_by_stage_with_config_and_dpo_metrics(chain):
    runs = {}
    for folder in sorted(chain.wandb_dir.glob("wandb/offline-run-*")):
        records = list(read_records(run_file(folder)))
        (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        config = {
            i.key: json.loads(i.value_json)
            for r in records
            if r.WhichOneof("record_type") == "config"
            for i in r.config.update
        }
        history = [
            {i.key or "/".join(i.nested_key): i for i in r.history.item}
            for r in records
            if r.WhichOneof("record_type") == "history"
        ]
        runs[run.run_group] = (run.display_name, config, {k for row in history for k in row})
    assert sorted(runs) == ["dpo", "sft"]
    name, config, logged = runs["dpo"]
    assert name == "dpo-dpo"
    assert config["alignkit"]["DPOConfig"]["beta"] == 0.1 and config["alignkit"]["ModelArguments"][
        "model_name_or_path"
    ] == str(chain.sft)
    assert {
        "train/rewards/chosen",
        "train/rewards/rejected",
        "train/rewards/margins",
        "train/rewards/accuracies",
        "eval/rewards/margins",
    } <= logged
    assert runs["sft"][0] == "sft-sft" and "SFTConfig" in runs["sft"][1]["alignkit"]
