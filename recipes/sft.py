"""SFT: instruction tuning with trl's SFTTrainer on a LoRA / 4-bit QLoRA backbone.

    accelerate launch recipes/sft.py --config recipes/tiny/sft.yaml [--key value ...]

Data: a ``messages`` column (chat) or ``prompt`` + ``completion`` columns. With ``assistant_only_loss: true`` only
assistant turns carry labels; prompt/completion data trains on completions only (trl's default).
"""

from trl import SFTTrainer

from alignkit.config import SFTConfig, parse_recipe
from alignkit.data import SFT
from alignkit.errors import run_cli
from alignkit.train import Run


def main(argv=None):
    recipe = parse_recipe(SFTConfig, argv)
    run = Run(recipe, stage="sft")
    # train_on_completions: a pad equal to eos would hide the eos the model must learn to emit.
    run.load_tokenizer(chat=True, assistant_only_loss=recipe.train.assistant_only_loss, train_on_completions=True)
    data = run.load_data(SFT)
    run.load_model("causal_lm")
    return run.train(run.build_trainer(SFTTrainer, data))


if __name__ == "__main__":
    run_cli(main)
