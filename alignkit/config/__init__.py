"""One config system: typed dataclasses per concern, YAML + CLI, strict keys, cross-field checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

from alignkit.config.args import (
    MODEL_GROUPS,
    AdapterArguments,
    DataArguments,
    DatasetSource,
    ModelArguments,
    QuantizationArguments,
    RunArguments,
)
from alignkit.config.parser import RecipeParser, dump_config, resolved_config
from alignkit.config.validate import validate

G = TypeVar("G")
# alignkit.config.trainers subclasses trl's and transformers' configs (importing them takes seconds): loaded on first
# use, so that the parser, the key reference and ``alignkit <stage> --help`` do without them.
_TRAINERS = (
    "CPTConfig", "DistillConfig", "DPOConfig", "GRPOConfig", "KTOConfig", "RewardConfig", "RewardFunctionArguments",
    "RLOOConfig", "SFTConfig", "TaskArguments", "TaskConfig", "ToolArguments",
)  # fmt: skip
_EXPERIMENTAL = ("OnlineDPOConfig", "ORPOConfig", "SimPOConfig")  # alignkit.config.experimental, imported on first use
_EMBEDDING = ("EmbedConfig", "EmbeddingArguments")  # alignkit.config.embedding (sentence-transformers), likewise


def __getattr__(name: str):
    if name in _TRAINERS:
        from alignkit.config import trainers

        return getattr(trainers, name)
    if name in _EXPERIMENTAL:
        from alignkit.config import experimental

        return getattr(experimental, name)
    if name in _EMBEDDING:
        from alignkit.config import embedding

        return getattr(embedding, name)
    raise AttributeError(f"module 'alignkit.config' has no attribute '{name}'")


@dataclass
class Recipe:
    """Every group of one stage's configuration, typed."""

    model: ModelArguments
    quant: QuantizationArguments
    adapter: AdapterArguments
    data: DataArguments
    run: RunArguments
    train: Any  # the stage's trainer config (alignkit.stages names each stage's)
    extra: tuple = ()
    explicit: frozenset = frozenset()  # the keys the recipe (YAML or command line) set; the rest are defaults

    @property
    def groups(self) -> tuple:
        return (self.model, self.quant, self.adapter, self.data, self.run, self.train, *self.extra)

    def group(self, cls: type[G]) -> G:
        """The stage's own group of class ``cls`` (e.g. ``TaskArguments``, ``RewardFunctionArguments``), by name
        rather than by position; KeyError naming the groups this recipe has when it has none of that class."""
        for group in self.extra:
            if isinstance(group, cls):
                return group
        raise KeyError(f"this recipe has no {cls.__name__} group (it has {[type(g).__name__ for g in self.groups]})")

    def resolved(self) -> dict[str, dict[str, Any]]:
        return resolved_config(self.groups)

    def dump(self) -> str:
        return dump_config(self.groups)


def recipe_parser(
    train_config_cls, extra: tuple[type, ...] = (), elsewhere=None, name: str = "<stage>"
) -> RecipeParser:
    """The parser of a stage's recipe: the shared groups, the stage's trainer config, and ``extra`` groups.
    ``elsewhere``, ``name``: see :class:`RecipeParser`."""
    return RecipeParser((*MODEL_GROUPS, train_config_cls, *extra), elsewhere, name)


def build_recipe(parser: RecipeParser, values: dict[str, Any], print_config: bool = False) -> Recipe:
    """A validated :class:`Recipe` from checked values (``RecipeParser.read``)."""
    from alignkit.config.trainers import precision_defaults

    groups = parser.finish({**values, **precision_defaults(values, parser.types)}, print_config)
    recipe = Recipe(*groups[:6], extra=tuple(groups[6:]), explicit=frozenset(values))
    validate(recipe)
    return recipe


def parse_recipe(train_config_cls, argv: list[str] | None = None, extra: tuple[type, ...] = ()) -> Recipe:
    """Parse ``--config recipe.yaml`` and CLI overrides into a validated :class:`Recipe`."""
    parser = recipe_parser(train_config_cls, extra)
    return build_recipe(parser, *parser.read(argv))


__all__ = [
    "AdapterArguments",
    "CPTConfig",
    "DPOConfig",
    "DataArguments",
    "DatasetSource",
    "DistillConfig",
    "EmbedConfig",
    "EmbeddingArguments",
    "GRPOConfig",
    "KTOConfig",
    "ModelArguments",
    "OnlineDPOConfig",
    "ORPOConfig",
    "QuantizationArguments",
    "Recipe",
    "RecipeParser",
    "RewardConfig",
    "RewardFunctionArguments",
    "RLOOConfig",
    "RunArguments",
    "SFTConfig",
    "SimPOConfig",
    "TaskArguments",
    "TaskConfig",
    "ToolArguments",
    "build_recipe",
    "parse_recipe",
    "recipe_parser",
    "validate",
]
