"""CPT -> SFT -> DPO as one chain on the tiny Llama: each stage starts from the previous stage's output directory, and
the final output's metadata (alignkit_run.json) and model card name all three stages and their hand-offs."""

import json

from conftest import log_history, run_recipe

FAST = "--load_in_4bit false --test_size 0 --max_steps 2 --disable_tqdm true --save_steps 1000".split()


def test_cpt_sft_dpo_chain_records_every_stage(tmp_path):
    cpt, sft, dpo = tmp_path / "cpt", tmp_path / "sft", tmp_path / "dpo"
    run_recipe("cpt", ["--config", "recipes/tiny/cpt.yaml", *FAST, "--output_dir", str(cpt)])
    run_recipe(
        "sft", ["--config", "recipes/tiny/sft.yaml", *FAST, "--model_name_or_path", str(cpt), "--output_dir", str(sft)]
    )
    run_recipe(
        "dpo", ["--config", "recipes/tiny/dpo.yaml", *FAST, "--model_name_or_path", str(sft), "--output_dir", str(dpo)]
    )

    meta = json.loads((dpo / "alignkit_run.json").read_text())
    assert meta["status"] == "finished" and meta["stage"] == "dpo"
    assert meta["base_model_args"]["model_name_or_path"] == "tiny:llama"
    lineage = meta["lineage"]
    assert [e["stage"] for e in lineage] == ["cpt", "sft", "dpo"]
    assert [e["output_dir"] for e in lineage] == [str(cpt), str(sft), str(dpo)]
    assert [e["from_adapter"] for e in lineage] == [None, str(cpt), str(sft)]
    assert [e["from_stage"] for e in lineage] == [None, "cpt", "sft"]
    assert [e["adapter_handoff"] for e in lineage] == [None, "continue", "continue"]
    assert [d["path"] for e in lineage for d in e["datasets"]] == [
        f"recipes/tiny/data/{s}.jsonl" for s in ("cpt", "sft", "dpo")
    ]
    card = (dpo / "README.md").read_text()
    for i, stage in enumerate(("cpt", "sft", "dpo"), 1):
        assert f"| {i} | {stage} |" in card and f"`{stage}.jsonl` (x1.0, " in card  # the file's name, not its path
    assert len([e for e in log_history(dpo) if "loss" in e]) == 2  # each stage trained
