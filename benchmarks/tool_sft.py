"""Tool-use SFT (issue 36): how often a model answers a held-out question with a well-formed tool call, before and
after a short LoRA SFT on generated calculator conversations.

    python benchmarks/tool_sft.py --size smollm2                 # SmolLM2-135M-Instruct, minutes on 2 CPU cores
    python benchmarks/tool_sft.py --size tiny --steps 2          # wiring only (tests/benchmarks/), seconds

Data (``alignkit.demo.tool_data``): the demo's two-digit sums as OpenAI-format tool conversations (``tools`` with a
``calculator`` schema, an assistant ``tool_calls`` turn, the ``tool`` result, the final ``ANSWER: n`` reply). The
model is asked and trained in one chat format: Qwen2.5's stock template (``chat_template: qwen2_5``: ChatML, the
same ``<|im_start|>``/``<|im_end|>`` tokens SmolLM2 uses, and Hermes-style ``<tool_call>`` JSON; SmolLM2-135M's own
template renders no tools, so alignkit refuses tool rows on it and names the families that render them).
Training is alignkit's SFT recipe (``recipes/smollm2/sft_lora.yaml``: LoRA r16 on every linear layer, assistant-only
loss through the proven training twin), in this process. Each held-out question is answered greedily with the
tools rendered into the prompt; the reply's tokens are parsed by the family's response parser (trl's
``add_response_schema`` + ``parse_response``) and scored by ``alignkit.demo.tool_data.call_score``: well-formed
(one call to ``calculator`` with an arguments object holding ``expression``) and right (the expression is the
question's sum). With ``--final_answer`` a second pass gives each question the gold call and the tool's result, and
scores the final reply in the demo's format (``ANSWER: n`` right). Sized for 2 shared CPU cores: the tools preamble
makes each row ~330 tokens, so prefill dominates evaluation and a step costs a few seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import harness

# size -> (model, recipe, extra recipe arguments): a row is ~330 SmolLM2 tokens, ~800 in the tiny BPE (the tiny
# model's 512 positions are raised: its weights are random anyway)
MODELS = {
    "smollm2": ("smollm2:SmolLM2-135M-Instruct", "recipes/smollm2/sft_lora.yaml", ["--max_length", "512"]),
    "tiny": (
        "tiny:llama",
        "recipes/tiny/sft.yaml",
        ["--max_length", "1024", "--config_overrides", '{"max_position_embeddings": 1024}'],
    ),
}
FAMILY = "qwen2_5"


def measure(model, tokenizer, held_out: list[dict], max_new_tokens: int, final_answer: bool = False) -> dict:
    """Share of held-out questions answered with a well-formed / right calculator call (parsed by trl's
    ``parse_response`` with the family's response schema); with ``final_answer``, also the share of right final
    answers when the gold call and the tool's result are given."""
    from trl.chat_template_utils import add_response_schema, parse_response

    from alignkit.demo.data import score
    from alignkit.demo.tool_data import TOOLS, call, call_score, prompt
    from alignkit.demo.tool_eval import generate  # greedy, tools rendered, replies cut after the first stop token

    add_response_schema(tokenizer)  # the family's parser (Qwen2.5's stock template -> trl's qwen3 response schema)
    started = time.time()
    firsts = generate(model, tokenizer, [prompt(r["a"], r["b"]) for r in held_out], TOOLS, max_new_tokens)
    scores, examples = [], []
    for r, (prefix, reply) in zip(held_out, firsts):
        parsed = parse_response(tokenizer, reply, prefix=prefix, tools=TOOLS)
        scores.append(call_score(parsed, r["a"], r["b"]))
        examples.append(tokenizer.decode(reply))
    result = {
        "well_formed": sum(s["well_formed"] for s in scores) / len(held_out),
        "right_call": sum(s["right"] for s in scores) / len(held_out),
        "final_answer": None,
        "example": examples[0],
    }
    if not final_answer:
        return {**result, "seconds": time.time() - started}
    given = [
        [
            *prompt(r["a"], r["b"]),
            call(r["a"], r["b"]),
            {"role": "tool", "name": "calculator", "content": str(r["a"] + r["b"])},
        ]  # fmt: skip
        for r in held_out
    ]
    finals = generate(model, tokenizer, given, TOOLS, max_new_tokens)
    answers = [score(tokenizer.decode(reply, skip_special_tokens=True), r["a"] + r["b"])["exact"] for r, (_, reply) in zip(held_out, finals)]  # fmt: skip
    return {**result, "final_answer": sum(answers) / len(held_out), "seconds": time.time() - started}


def _load(path: str, family_template: bool):
    from alignkit.data.chat_families import stock_template
    from alignkit.export.generate import load_for_generation

    model, tokenizer = load_for_generation(path)
    if family_template:  # the base is asked in the format it will be trained in
        tokenizer.chat_template = stock_template(FAMILY)
    return model, tokenizer


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(MODELS), default="smollm2")
    parser.add_argument("--train_rows", type=int, default=200)
    parser.add_argument("--eval_rows", type=int, default=20)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--max_new_tokens", type=int, default=40, help="a call is ~30 SmolLM2 tokens")
    parser.add_argument("--final_answer", action="store_true", help="also score the reply to the tool's result")
    parser.add_argument("--out_dir", default=None, help="keep the data and the adapter here (default: a temp dir)")
    args = parser.parse_args(argv)

    from alignkit.data.chat_families import stock_template
    from alignkit.demo.tool_data import tool_rows

    load_at_start = harness.load_average()
    name, recipe, extra = MODELS[args.size]
    keep = args.out_dir is not None
    work = Path(args.out_dir) if keep else Path(tempfile.mkdtemp(prefix="alignkit-tool-sft-"))
    rows = tool_rows(args.train_rows, args.eval_rows)
    data = harness.write_jsonl(work / "tool_sft.jsonl", rows["train"])

    model, tokenizer = _load(name, family_template=True)
    before = measure(model, tokenizer, rows["eval"], args.max_new_tokens, args.final_answer)
    print(f"before: {before}", file=sys.stderr, flush=True)
    del model

    out = work / "sft"
    argv_sft = ["--config", recipe, "--model_name_or_path", name, "--chat_template", FAMILY, "--load_in_4bit",
                "false", "--datasets", str(data), "--test_size", "0", "--eval_strategy", "no", *extra, "--max_steps", str(args.steps), "--per_device_train_batch_size", str(args.batch),
                "--learning_rate", str(args.learning_rate), "--lr_scheduler_type", "constant", "--save_strategy",
                "no", "--report_to", "none", "--disable_tqdm", "true", "--output_dir", str(out)]  # fmt: skip
    started = time.time()
    harness.run_recipe("sft", argv_sft)
    train_s = time.time() - started

    model, tokenizer = _load(str(out), family_template=False)
    assert tokenizer.chat_template == stock_template(FAMILY), "the run saves the family's stock template"
    after = measure(model, tokenizer, rows["eval"], args.max_new_tokens, args.final_answer)

    table = [
        {"model": f"{name} (base)", **before},
        {"model": f"after SFT ({args.steps} steps x {args.batch} rows, {train_s:.0f} s)", **after},
    ]
    print(f"\nTool-use SFT, {len(rows['eval'])} held-out questions ({harness.machine(load_at_start)})")
    print(f"chat format: {FAMILY} (stock template; trained with its proven twin), parser: trl parse_response")
    print(
        harness.table(
            table,
            [
                ("model", "model", "s"),
                ("well-formed call", "well_formed", ".0%"),
                ("right call", "right_call", ".0%"),
                ("right final answer (given the result)", "final_answer", ".0%"),
                ("eval s", "seconds", ".0f"),
            ],
        )
    )
    for row in table:
        print(f"first reply, {row['model']}: {json.dumps(row['example'])}")
    if not keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return table


if __name__ == "__main__":
    main()
