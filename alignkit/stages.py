"""The stage registry: one row per training stage, naming its trainer config, its data schema and its trainer.

A new trl-backed stage (KTO, ORPO, reward modeling, GRPO, RLOO, distillation...) is a recipe file ``recipes/<name>.py`` (its ``main``), a
config class in alignkit.config, a schema in alignkit.data.schemas, and one row here; ``alignkit <name>`` and
``accelerate launch recipes/<name>.py`` then both run it. Rows name their classes as strings, resolved on use, so
that listing the stages (``alignkit --help``) imports neither torch nor trl.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from functools import cached_property

from alignkit.errors import ConfigError, suggest


@dataclass(frozen=True)
class Stage:
    name: str
    summary: str
    config: str  # trainer config class in alignkit.config
    schema: str | None  # row schema in alignkit.data.schemas (None: the task module gives it)
    trainer: str  # "module:Class"
    extra: tuple[str, ...] = ()  # further config groups of this stage's recipe, in alignkit.config
    head: str | None = "causal_lm"  # the model head it trains (alignkit.models.heads); None: the recipe's ``task``
    reference: bool = False  # trains against a reference model (the starting one): DPO, KTO

    @cached_property
    def config_class(self) -> type:
        return getattr(importlib.import_module("alignkit.config"), self.config)

    @cached_property
    def extra_classes(self) -> tuple[type, ...]:
        config = importlib.import_module("alignkit.config")
        return tuple(getattr(config, name) for name in self.extra)

    @cached_property
    def data_schema(self):
        return getattr(importlib.import_module("alignkit.data.schemas"), self.schema) if self.schema else None

    @cached_property
    def trainer_class(self) -> type:
        module, name = self.trainer.split(":")
        return getattr(importlib.import_module(module), name)

    def parser(self, extra: tuple[type, ...] = ()):
        """The recipe parser of this stage; a key that only another stage knows is named as that stage's."""
        from alignkit.config import recipe_parser

        return recipe_parser(
            self.config_class, (*self.extra_classes, *extra), elsewhere=self.owner_elsewhere, name=self.name
        )

    def parse(self, argv: list[str] | None = None):
        """``--config X.yaml`` and ``--key value`` overrides -> a validated :class:`alignkit.config.Recipe`."""
        from alignkit.config import build_recipe

        parser = self.parser()
        return build_recipe(parser, *parser.read(argv))

    def owner_elsewhere(self, key: str) -> list[str]:
        """The other stages whose recipe takes ``key``, in registry order: their keys as the checked-in key
        reference lists them (alignkit.config.keyref, the same rows ``--help-all`` prints; the task recipe's include
        every head's keys, e.g. ``label_list``), so that a key given to the wrong stage names the stage it belongs
        to rather than a look-alike key of this one."""
        return [name for name in _stages_by_key().get(key, ()) if name != self.name]


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage(
            "cpt", "causal-LM pretraining on raw text, packed into blocks", "CPTConfig", "CPT", "transformers:Trainer"
        ),
        Stage(
            "sft", "supervised fine-tuning on chats or prompt/completion pairs", "SFTConfig", "SFT", "trl:SFTTrainer"
        ),
        Stage(
            "dpo", "preference tuning on prompt/chosen/rejected", "DPOConfig", "DPO", "trl:DPOTrainer", reference=True
        ),
        Stage(
            "kto",
            "KTO on unpaired prompt/completion/label rows (or unpaired pairs)",
            "KTOConfig",
            "KTO",
            "trl:KTOTrainer",
            reference=True,
        ),
        Stage(
            "orpo",
            "ORPO: SFT and preference in one reference-free loss, on pairs",
            "ORPOConfig",
            "ORPO",
            "trl.experimental.orpo:ORPOTrainer",
        ),
        Stage(
            "simpo",
            "SimPO: length-normalised reference-free preference loss, on pairs",
            "SimPOConfig",
            "SIMPO",
            "trl.experimental.cpo:CPOTrainer",
        ),
        Stage(
            "reward",
            "reward model: a scalar head on the backbone, trained on pairs",
            "RewardConfig",
            "REWARD",
            "trl:RewardTrainer",
            head="seq_cls",
        ),
        Stage(
            "grpo",
            "GRPO: sampled completions scored by verifiable or learned rewards",
            "GRPOConfig",
            "GRPO",
            "trl:GRPOTrainer",
            extra=("RewardFunctionArguments", "ToolArguments"),
        ),
        Stage(
            "rloo",
            "RLOO: REINFORCE leave-one-out on sampled completions, verifiable or learned rewards",
            "RLOOConfig",
            "GRPO",
            "trl:RLOOTrainer",
            extra=("RewardFunctionArguments",),
        ),
        Stage(
            "online_dpo",
            "online DPO: pairs of sampled completions ranked by a reward model or function, DPO's loss",
            "OnlineDPOConfig",
            "ONLINE_DPO",
            "trl.experimental.online_dpo:OnlineDPOTrainer",
            extra=("RewardFunctionArguments",),
        ),
        Stage(
            "distill",
            "distillation: the student samples, a teacher with its vocabulary scores every token",
            "DistillConfig",
            "DISTILL",
            "trl:DistillationTrainer",
        ),
        Stage(
            "embed",
            "sentence embeddings: pairs, triplets or scored pairs (sentence-transformers)",
            "EmbedConfig",
            "EMBED",
            "sentence_transformers:SentenceTransformerTrainer",
            extra=("EmbeddingArguments",),
            head="embedding",
        ),
        Stage(
            "task",
            "classical task heads: token_cls, seq_cls, qa, mlm, seq2seq",
            "TaskConfig",
            None,
            "transformers:Trainer",
            extra=("TaskArguments",),
            head=None,
        ),
    )
}


@functools.cache
def _stages_by_key() -> dict[str, tuple[str, ...]]:
    """key -> the stages whose recipe takes it (registry order), from the checked-in key reference."""
    from alignkit.config.keyref import load_reference

    reference, found = load_reference(), {}
    for name in STAGES:
        for row in reference.get(name, ()):
            found.setdefault(row["key"], []).append(name)
    return {key: tuple(names) for key, names in found.items()}


def stages_training(head: str) -> list[str]:
    """The names of the stages whose recipe trains ``head``, in registry order (for messages that list them)."""
    return [s.name for s in STAGES.values() if s.head == head]


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise ConfigError(f"unknown stage '{name}'.{suggest(name, STAGES)} Fix: use one of {sorted(STAGES)}.")
    return STAGES[name]
