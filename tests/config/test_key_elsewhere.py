"""A key of another stage names the stage(s) that take it (defect 17b-3): ``alignkit sft --label_list a,b`` said
"Did you mean 'label_names'?" (a look-alike key of SFT) instead of naming the task recipe, and a key of several
stages (``beta``) named only the first one, and only when no look-alike existed. Did-you-mean stays for typos."""

import pytest

from alignkit.config.keyref import load_reference
from alignkit.errors import ConfigError
from alignkit.stages import STAGES


def _read(stage, argv):
    return STAGES[stage].parser().read(argv)


@pytest.mark.parametrize(
    "stage, key, owners",
    [
        ("sft", "label_list", ["task"]),
        ("sft", "beta", ["dpo", "kto", "orpo", "simpo", "grpo", "rloo", "online_dpo", "distill"]),
        ("dpo", "num_generations", ["grpo", "rloo"]),
        ("cpt", "assistant_only_loss", ["sft"]),
    ],
)
def test_a_key_of_other_stages_names_every_one_and_no_look_alike(tmp_path, stage, key, owners):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model_name_or_path: tiny:llama\n{key}: 1\n")
    for argv, where in ((["--config", str(recipe)], str(recipe)), ([f"--{key}", "1"], "command line")):
        with pytest.raises(ConfigError) as caught:
            _read(stage, argv)
        message = str(caught.value)
        names = "the " + (f"{owners[0]} recipe" if len(owners) == 1 else f"{', '.join(owners)} recipes")
        assert message.startswith(f"{where}: unknown key '{key}': it is a key of {names}, not of the {stage} recipe.")
        assert f"alignkit {' / '.join(owners)} --config" in message and "Did you mean" not in message


def test_every_key_of_another_stage_names_exactly_the_stages_that_take_it():
    reference = load_reference()
    takes = {name: {row["key"] for row in rows} for name, rows in reference.items()}
    for stage in ("sft", "dpo", "grpo", "task"):
        parser = STAGES[stage].parser() if stage != "task" else None
        if parser is None:
            from alignkit.tasks import recipe_parser

            parser = recipe_parser(STAGES["task"])
        for key in sorted(set().union(*takes.values()) - takes[stage]):
            owners = [name for name in STAGES if key in takes[name]]
            with pytest.raises(ConfigError, match=f"it is a key of the {owners[0]}[ ,]") as caught:
                parser.read([f"--{key}", "1"])
            assert ", ".join(owners) in str(caught.value) and "Did you mean" not in str(caught.value)


def test_a_typo_still_gets_did_you_mean():
    with pytest.raises(ConfigError, match="unknown key 'learning_rat'. Did you mean 'learning_rate'"):
        _read("sft", ["--learning_rat", "1"])
    with pytest.raises(ConfigError, match="unknown key 'label_lists'. Did you mean 'label_list'"):
        from alignkit.tasks import recipe_parser

        recipe_parser(STAGES["task"]).read(["--label_lists", "a"])
