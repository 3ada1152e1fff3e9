"""Every documented hand-off among the shipped recipes (tiny and smollm2: sft -> dpo/kto/simpo/grpo under
``adapter_handoff: continue``) parses and passes the hand-off preflight against the adapter config its SFT recipe
writes (peft's own ``LoraConfig.save_pretrained`` of the recipe's adapter keys: what the SFT run saves). No model
loads: the adapter config alone decides the hand-off."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from alignkit.errors import PreflightError
from alignkit.models.loader import get_peft_config
from alignkit.stages import STAGES
from alignkit.train.checks import check_handoff

REPO = Path(__file__).resolve().parents[2]


def _chains():
    """(continuing recipe, the SFT recipe whose output_dir it names) for every shipped recipe that continues one."""
    sft_by_output = {}
    for path in sorted(REPO.glob("recipes/*/sft*.yaml")):
        sft_by_output[yaml.safe_load(path.read_text())["output_dir"]] = path
    chains = []
    for path in sorted(REPO.glob("recipes/*/*.yaml")):
        data = yaml.safe_load(path.read_text())
        if data.get("adapter_handoff") == "continue" and data.get("model_name_or_path") in sft_by_output:
            chains.append((path, sft_by_output[data["model_name_or_path"]]))
    return chains


CHAINS = _chains()


def test_the_documented_chains_are_found():
    names = {(p.parent.name, p.stem) for p, _ in CHAINS}
    for family in ("tiny", "smollm2"):
        for stage in ("dpo", "kto", "simpo", "grpo"):
            assert any(f == family and s.startswith(stage) for f, s in names), (family, stage, names)


def _stage_of(path: Path) -> str:
    """The stage a recipe file is for: the longest stage name its stem starts with (online_dpo_qlora -> online_dpo)."""
    return max((s for s in STAGES if path.stem == s or path.stem.startswith(s + "_")), key=len)


@pytest.mark.parametrize("recipe,sft", CHAINS, ids=[f"{s.parent.name}/{s.stem}->{p.stem}" for p, s in CHAINS])
def test_shipped_chain_hands_off(recipe, sft, tmp_path):
    sft_recipe = STAGES["sft"].parse(["--config", str(sft)])
    adapter = tmp_path / "sft"
    get_peft_config(sft_recipe.adapter).save_pretrained(str(adapter))  # the adapter_config.json SFT writes
    later = STAGES[_stage_of(recipe)].parse(["--config", str(recipe), "--model_name_or_path", str(adapter)])
    check_handoff(later, SimpleNamespace(adapter_dir=str(adapter)))  # raises PreflightError on a clash


def test_a_structural_clash_names_the_recipe_value_and_the_adapter_file(tmp_path):
    recipe, sft = next((p, s) for p, s in CHAINS if p.parent.name == "smollm2" and p.stem.startswith("dpo"))
    adapter = tmp_path / "sft"
    get_peft_config(STAGES["sft"].parse(["--config", str(sft)]).adapter).save_pretrained(str(adapter))
    later = STAGES["dpo"].parse(["--config", str(recipe), "--model_name_or_path", str(adapter), "--lora_r", "8"])
    with pytest.raises(PreflightError, match=r"lora_r 8 in the recipe, r 16 in .*sft/adapter_config\.json"):
        check_handoff(later, SimpleNamespace(adapter_dir=str(adapter)))
