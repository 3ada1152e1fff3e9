"""CPT: causal-LM pretraining on raw ``text``, packed into fixed blocks; continued from a pretrained model (LoRA,
QLoRA or full) or from scratch (``from_scratch: true``: random init from the model's config, full training).

    accelerate launch recipes/cpt.py --config recipes/tiny/cpt.yaml [--key value ...]      (or: alignkit cpt ...)
"""

from alignkit.data.packing import collate_blocks, pack_text_blocks
from alignkit.errors import run_cli
from alignkit.stages import STAGES
from alignkit.train import Run

STAGE = STAGES["cpt"]


def main(argv=None):
    recipe = STAGE.parse(argv)
    with Run(recipe, stage=STAGE.name) as run:
        tokenizer = run.load_tokenizer()
        data = run.load_data(STAGE.data_schema)
        with recipe.train.main_process_first(desc="pack text"):
            blocks = {
                s: pack_text_blocks(ds, tokenizer, recipe.train.block_size, recipe.data.dataset_num_proc)
                for s, ds in data.items()
            }
        run.load_model()
        return run.train(run.build_trainer(STAGE.trainer_class, blocks, data_collator=collate_blocks))


if __name__ == "__main__":
    run_cli(main)
