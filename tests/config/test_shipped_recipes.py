"""Every YAML recipe the repo ships parses and validates (a recipe that rots fails here, not on a user's GPU)."""

from pathlib import Path

import pytest
import yaml

from alignkit.stages import STAGES
from alignkit.tasks import parse_task_recipe

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if "data" not in p.parts)


def _stage_for(path: Path) -> str:
    """The stage a recipe file is for, from its name (sft_qlora.yaml, dpo.yaml, task_ner.yaml, ner.yaml)."""
    name = path.stem
    # the longest stage name that fits: online_dpo.yaml is online_dpo's, not dpo's
    for stage in sorted(STAGES, key=len, reverse=True):
        if stage != "task" and (name.startswith(stage) or name.endswith(stage)):
            return stage
    return "task"


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(REPO)) for p in RECIPES])
def test_recipe_parses_and_validates(path):
    stage = _stage_for(path)
    argv = ["--config", str(path)]
    recipe = parse_task_recipe(argv) if stage == "task" else STAGES[stage].parse(argv)
    assert recipe.model.model_name_or_path
    assert recipe.data.datasets, f"{path} names no datasets"
    assert yaml.safe_load(recipe.dump())


def test_recipes_found():
    assert len(RECIPES) >= 2


def test_every_stage_ships_a_tiny_recipe():
    tiny = {_stage_for(p) for p in RECIPES if p.parent.name == "tiny"}
    assert tiny == set(STAGES), set(STAGES) - tiny
