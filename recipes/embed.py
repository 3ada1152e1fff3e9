"""Sentence embeddings: contrastive fine-tuning of an encoder with sentence-transformers' trainer, losses and
evaluators, on the backbone alignkit's loader builds (full, LoRA or 4-bit + LoRA):

    accelerate launch recipes/embed.py --config recipes/tiny/embed.yaml [--key value ...]      (or: alignkit embed ...)

Data: ``anchor``/``positive`` pairs, + ``negative`` triplets, or ``sentence1``/``sentence2``/``score`` pairs
(alignkit.tasks.embedding). Held-out retrieval (recall@1/10, MRR@10, NDCG@10) or Spearman, before and after training.
"""

from alignkit import config, runtime
from alignkit.errors import run_cli
from alignkit.export.merge_embedding import finish_embedding
from alignkit.stages import STAGES
from alignkit.tasks import embedding
from alignkit.train import Run

STAGE = STAGES["embed"]


def main(argv=None):
    recipe = STAGE.parse(argv)
    args = recipe.group(config.EmbeddingArguments)
    with Run(recipe, stage=STAGE.name) as run:
        data = run.load_data(STAGE.data_schema)
        fmt = embedding.check_loss(args, data, recipe.train)  # before the model loads
        model = embedding.sentence_transformer(run.load_model(), embedding.st_folder(run.source),
                                               args.max_seq_length)  # fmt: skip
        run.model, run.head_config = model, embedding.describe(model, args, fmt)
        loss, evaluator = embedding.build_loss(model, args, fmt), embedding.build_evaluator(data, fmt, recipe.train)
        metrics = run.train(run.build_trainer(STAGE.trainer_class, data, loss=loss, evaluator=evaluator), True)
    if metrics and runtime.is_main_process():  # LoRA: <output_dir>-merged; both: the saved model vs the trained one
        metrics.update(finish_embedding(run.output_dir, model, recipe.adapter.use_peft and args.merge_after_training))
    return metrics


if __name__ == "__main__":
    run_cli(main)
