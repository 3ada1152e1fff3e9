"""Classical task heads on the shared backbone (full precision, or 4-bit QLoRA with the head trained in full):

    accelerate launch recipes/task.py --config recipes/tiny/task_ner.yaml [--key value ...]      (or: alignkit task ...)

``task:`` picks the head and its module in alignkit/tasks/: token_cls (NER/POS: words + tags), seq_cls (text or text
pairs + label), qa (SQuAD: question, context, answers), mlm (text; perplexity before and after), seq2seq (source,
target; BLEU/ROUGE with predict_with_generate). Rows are checked before the model loads.
"""

from alignkit.errors import run_cli
from alignkit.tasks import build_task, parse_task_recipe, task_of
from alignkit.train import Run


def main(argv=None):
    recipe = parse_task_recipe(argv)
    with Run(recipe, stage="task", head=task_of(recipe).name) as run:
        tokenizer = run.load_tokenizer()
        task = build_task(recipe, tokenizer)
        data = run.load_data(task.schema)
        with recipe.train.main_process_first(desc="task features"):
            features = task.preprocess(data)
        model = run.load_model(**task.head_kwargs())
        trainer = run.build_trainer(
            task.trainer_class,
            features,
            data_collator=task.collator(model),
            compute_metrics=task.compute_metrics,
            preprocess_logits_for_metrics=task.preprocess_logits_for_metrics,
        )
        return run.train(trainer, evaluate_before=task.evaluate_before_training)


if __name__ == "__main__":
    run_cli(main)
