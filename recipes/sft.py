"""SFT: instruction tuning with trl's SFTTrainer on a LoRA / 4-bit QLoRA backbone.

    accelerate launch recipes/sft.py --config recipes/tiny/sft.yaml [--key value ...]      (or: alignkit sft ...)

Data: a ``messages`` column (chat) or ``prompt`` + ``completion`` columns. With ``assistant_only_loss: true`` only
assistant turns carry labels; prompt/completion data trains on completions only (trl's default).
"""

from alignkit.errors import run_cli
from alignkit.stages import STAGES
from alignkit.train import Run

STAGE = STAGES["sft"]


def main(argv=None):
    recipe = STAGE.parse(argv)
    with Run(recipe, stage=STAGE.name) as run:
        # train_on_completions: a pad equal to eos would hide the eos the model must learn to emit.
        run.load_tokenizer(chat=True, assistant_only_loss=recipe.train.assistant_only_loss, train_on_completions=True)
        data = run.load_data(STAGE.data_schema)
        run.load_model()
        return run.train(run.build_trainer(STAGE.trainer_class, data))


if __name__ == "__main__":
    run_cli(main)
