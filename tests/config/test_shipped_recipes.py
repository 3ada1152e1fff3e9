"""Every YAML recipe the repo ships parses and validates (a recipe that rots fails here, not on a user's GPU)."""

from pathlib import Path

import pytest
import yaml

from alignkit.config import CPTConfig, DPOConfig, SFTConfig, TaskConfig, parse_recipe

REPO = Path(__file__).resolve().parents[2]
STAGE_CONFIGS = {"cpt": CPTConfig, "sft": SFTConfig, "dpo": DPOConfig}
RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if "data" not in p.parts)


def _config_for(path: Path):
    name = path.stem
    for stage, cls in STAGE_CONFIGS.items():
        if name.startswith(stage) or name.endswith(stage):
            return cls, None
    return TaskConfig, "task"


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(REPO)) for p in RECIPES])
def test_recipe_parses_and_validates(path):
    cls, stage = _config_for(path)
    if stage == "task":
        from importlib import import_module

        parse = getattr(import_module("alignkit.tasks"), "parse_task_recipe", None)
        if parse is None:
            pytest.skip("alignkit.tasks has no parse_task_recipe")
        recipe = parse(["--config", str(path)])
    else:
        recipe = parse_recipe(cls, ["--config", str(path)])
    assert recipe.model.model_name_or_path
    assert recipe.data.datasets, f"{path} names no datasets"
    assert yaml.safe_load(recipe.dump())


def test_recipes_found():
    assert len(RECIPES) >= 2
