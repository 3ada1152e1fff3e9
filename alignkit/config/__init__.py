"""One config system: typed dataclasses per concern, YAML + CLI, strict keys, cross-field checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from alignkit.config.args import (
    MODEL_GROUPS,
    AdapterArguments,
    CPTConfig,
    DataArguments,
    DatasetSource,
    DPOConfig,
    ModelArguments,
    QuantizationArguments,
    RunArguments,
    SFTConfig,
    TaskConfig,
)
from alignkit.config.parser import RecipeParser, dump_config, resolved_config
from alignkit.config.validate import validate


@dataclass
class Recipe:
    """Every group of one stage's configuration, typed."""

    model: ModelArguments
    quant: QuantizationArguments
    adapter: AdapterArguments
    data: DataArguments
    run: RunArguments
    train: Any  # the stage's trainer config (CPTConfig, SFTConfig, DPOConfig, TaskConfig)
    extra: tuple = ()

    @property
    def groups(self) -> tuple:
        return (self.model, self.quant, self.adapter, self.data, self.run, self.train, *self.extra)

    def resolved(self) -> dict[str, dict[str, Any]]:
        return resolved_config(self.groups)

    def dump(self) -> str:
        return dump_config(self.groups)


def parse_recipe(train_config_cls, argv: list[str] | None = None, extra: tuple[type, ...] = ()) -> Recipe:
    """Parse ``--config recipe.yaml`` and CLI overrides into a validated :class:`Recipe`."""
    parser = RecipeParser((*MODEL_GROUPS, train_config_cls, *extra))
    groups = parser.parse(argv)
    recipe = Recipe(*groups[:6], extra=tuple(groups[6:]))
    validate(recipe)
    return recipe


__all__ = [
    "AdapterArguments",
    "CPTConfig",
    "DPOConfig",
    "DataArguments",
    "DatasetSource",
    "ModelArguments",
    "QuantizationArguments",
    "Recipe",
    "RecipeParser",
    "RunArguments",
    "SFTConfig",
    "TaskConfig",
    "parse_recipe",
    "validate",
]
