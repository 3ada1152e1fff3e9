"""CPT: causal-LM pretraining on raw ``text``, packed into fixed blocks; continued from a pretrained model (LoRA,
QLoRA or full) or from scratch (``from_scratch: true``: random init from the model's config, full training).

    accelerate launch recipes/cpt.py --config recipes/tiny/cpt.yaml [--key value ...]
"""

from transformers import Trainer, default_data_collator

from alignkit.config import CPTConfig, parse_recipe
from alignkit.data import CPT
from alignkit.data.packing import pack_text_blocks
from alignkit.errors import run_cli
from alignkit.train import Run


def main(argv=None):
    recipe = parse_recipe(CPTConfig, argv)
    run = Run(recipe, stage="cpt")
    tokenizer = run.load_tokenizer()
    data = run.load_data(CPT)
    with recipe.train.main_process_first(desc="pack text"):
        blocks = {split: pack_text_blocks(ds, tokenizer, recipe.train.block_size) for split, ds in data.items()}
    run.load_model("causal_lm")
    # blocks carry their labels (alignkit.data.packing): the default collator only stacks them
    return run.train(run.build_trainer(Trainer, blocks, data_collator=default_data_collator))


if __name__ == "__main__":
    run_cli(main)
