"""The memory planner (alignkit/train/plan.py) against measured peak memory: each configuration runs 2 training steps
in its own process (``alignkit <stage> ...``), its peak RSS read by the parent (``os.wait4``), beside the planner's
prediction for the same recipe and overrides on this machine. Prints the table docs/planning.md shows.

    nice -n 5 python benchmarks/plan_check.py                 # every configuration, one at a time (~15 min on 2 cores)
    python benchmarks/plan_check.py --only smollm2-sft-lora-b4 --json out.json

The rows are built longer than max_length (truncation allowed), so every batch holds batch x max_length tokens, the
length the planner plans for. fp32 on CPU (ALIGNKIT_CPU_AMP=off, as the test suite runs); no evaluation, one save at
the end. Gemma 3 rows run when `alignkit fetch gemma3:gemma-3-270m` has put it in the cache.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMOL = "smollm2:SmolLM2-135M-Instruct"
GEMMA = "gemma3:gemma-3-270m"
ENV = {"ALIGNKIT_CPU_AMP": "off", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
       "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip

# label: (stage, base recipe, model, overrides)
CONFIGS: dict[str, tuple[str, str, str, list[str]]] = {
    "tiny-sft-qlora-b4x128": ("sft", "recipes/tiny/sft.yaml", "tiny:llama", ["--per_device_train_batch_size", "4", "--max_length", "128"]),
    "tiny-sft-lora-b8x256": ("sft", "recipes/tiny/sft.yaml", "tiny:llama", ["--load_in_4bit", "false", "--per_device_train_batch_size", "8", "--max_length", "256"]),
    "tiny-dpo-qlora-b4x160": ("dpo", "recipes/tiny/dpo.yaml", "tiny:llama", ["--per_device_train_batch_size", "4", "--max_length", "160"]),
    "smollm2-sft-qlora-b1x128": ("sft", "recipes/smollm2/sft_qlora.yaml", SMOL, ["--per_device_train_batch_size", "1", "--max_length", "128"]),
    "smollm2-sft-lora-b1x128": ("sft", "recipes/smollm2/sft_lora.yaml", SMOL, ["--per_device_train_batch_size", "1", "--max_length", "128"]),
    "smollm2-sft-lora-b4x256": ("sft", "recipes/smollm2/sft_lora.yaml", SMOL, ["--per_device_train_batch_size", "4", "--max_length", "256"]),
    "smollm2-sft-lora-b4x256-ckpt": ("sft", "recipes/smollm2/sft_lora.yaml", SMOL, ["--per_device_train_batch_size", "4", "--max_length", "256", "--activation_checkpointing", "true"]),
    "smollm2-sft-lora-b8x256": ("sft", "recipes/smollm2/sft_lora.yaml", SMOL, ["--per_device_train_batch_size", "8", "--max_length", "256"]),
    "smollm2-sft-qlora-b4x256": ("sft", "recipes/smollm2/sft_qlora.yaml", SMOL, ["--per_device_train_batch_size", "4", "--max_length", "256"]),
    "smollm2-sft-qlora-b4x256-ckpt": ("sft", "recipes/smollm2/sft_qlora.yaml", SMOL, ["--per_device_train_batch_size", "4", "--max_length", "256", "--activation_checkpointing", "true"]),
    "smollm2-sft-qlora-b2x512": ("sft", "recipes/smollm2/sft_qlora.yaml", SMOL, ["--per_device_train_batch_size", "2", "--max_length", "512"]),
    "smollm2-dpo-qlora-b2x256": ("dpo", "recipes/smollm2/dpo_qlora.yaml", SMOL, ["--per_device_train_batch_size", "2", "--max_length", "256"]),
    "smollm2-dpo-lora-b4x160-ckpt": ("dpo", "recipes/smollm2/dpo_qlora.yaml", SMOL, ["--load_in_4bit", "false", "--per_device_train_batch_size", "4", "--max_length", "160", "--activation_checkpointing", "true"]),
    "gemma3-sft-qlora-b4x256": ("sft", "recipes/smollm2/sft_qlora.yaml", GEMMA, ["--chat_template", "gemma3", "--per_device_train_batch_size", "4", "--max_length", "256"]),
    "gemma3-sft-lora-b2x256-ckpt": ("sft", "recipes/smollm2/sft_lora.yaml", GEMMA, ["--chat_template", "gemma3", "--per_device_train_batch_size", "2", "--max_length", "256", "--activation_checkpointing", "true"]),
    "gemma3-dpo-qlora-b2x128": ("dpo", "recipes/smollm2/dpo_qlora.yaml", GEMMA, ["--chat_template", "gemma3", "--per_device_train_batch_size", "2", "--max_length", "128"]),
}  # fmt: skip
COMMON = ["--max_steps", "2", "--test_size", "0", "--save_steps", "1000", "--logging_steps", "1",
          "--max_truncated_fraction", "1.0", "--report_to", "none", "--eval_strategy", "no"]  # fmt: skip

SYSTEM = "You are a careful calculator. End every reply with a line 'ANSWER: <number>'."


def write_data(folder: Path, rows: int = 48) -> dict[str, Path]:
    """SFT and DPO rows far longer than any max_length used here (each reply ~2,000 tokens)."""
    folder.mkdir(parents=True, exist_ok=True)
    sft, dpo = folder / "sft.jsonl", folder / "dpo.jsonl"
    with open(sft, "w") as f_sft, open(dpo, "w") as f_dpo:
        for i in range(rows):
            a, b = 10 + i, 37 + 3 * i
            steps = " ".join(f"Step {k}: add {a} and {b + k} to get {a + b + k}." for k in range(150))
            prompt = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"What is {a} + {b}?"}]
            reply = f"{steps}\nANSWER: {a + b}"
            f_sft.write(json.dumps({"messages": [*prompt, {"role": "assistant", "content": reply}]}) + "\n")
            f_dpo.write(json.dumps({"prompt": prompt, "chosen": [{"role": "assistant", "content": reply}],
                                    "rejected": [{"role": "assistant", "content": reply.replace("add", "sum")}]}) + "\n")  # fmt: skip
    return {"sft": sft, "dpo": dpo}


def argv_for(label: str, data: dict[str, Path], out: Path) -> tuple[str, list[str]]:
    stage, recipe, model, overrides = CONFIGS[label]
    argv = ["--config", str(REPO / recipe), "--model_name_or_path", model, "--datasets", str(data[stage]),
            "--output_dir", str(out), *COMMON, *overrides]  # fmt: skip
    if stage == "dpo":
        argv += ["--eval_on_start", "false"] + ([] if "--chat_template" in overrides else ["--chat_template", "chatml"])
    return stage, argv


def predict(stage: str, argv: list[str]) -> dict:
    from alignkit.stages import STAGES
    from alignkit.train.plan import MiB, plan_recipe

    plan = plan_recipe(STAGES[stage].parse(argv), stage)
    return {"predicted_mib": plan.total / MiB, "parts_mib": {n: round(b / MiB) for n, b, _ in plan.rows}}


def measure(stage: str, argv: list[str]) -> dict:
    """Run the stage in a child process; its peak RSS (MiB) and wall seconds."""
    code = "import json, sys; from alignkit.cli import main; sys.exit(main(json.loads(sys.argv[1])))"
    env = {**os.environ, **ENV, "PYTHONPATH": str(REPO)}
    start = time.time()
    child = subprocess.Popen([sys.executable, "-c", code, json.dumps([stage, *argv])], env=env, cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise RuntimeError(f"{stage} exited {child.returncode}:\n{output[-3000:]}")
    return {"measured_mib": usage.ru_maxrss / 1024, "seconds": round(time.time() - start, 1)}


# Published figures the GPU predictions are checked against (docs/planning.md): (label, model config, setup, figure,
# source). The setups follow each source's stated settings; where the source's trainer differs from alignkit's the
# difference is named.
def published() -> list[dict]:
    from alignkit.train.plan import CONFIG_DIR, Arch, GiB, Setup, estimate, gpu_spec

    def arch(name: str) -> Arch:
        return Arch.from_config(json.loads((CONFIG_DIR / f"{name}.json").read_text()))

    rows = []
    for label, model, setup, figure, source in (
        ("LLaMA 65B QLoRA (r=64, all linear, checkpointing), 1 x 512 tokens", "huggyllama--llama-65b",
         Setup(load_in_4bit=True, lora_r=64, seq=512, checkpointing=True, device="A6000", weights_dtype="bfloat16"),
         "fits one 48 GB GPU", "QLoRA paper (Dettmers et al. 2023, arXiv:2305.14314), abstract; Guanaco-65B card: r=64, all linear layers, sequence length 512"),
        ("Llama 2 7B QLoRA (torchtune: r=8, q/v/o + MLP, checkpointing), 2 x 512 tokens", "huggyllama--llama-7b",
         Setup(load_in_4bit=True, lora_r=8, lora_targets=["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
               batch=2, seq=512, checkpointing=True, device="24GB", weights_dtype="bfloat16"),
         "< 10 GB", "torchtune tutorial 'Fine-Tuning Llama2 with QLoRA' (pytorch.org/torchtune/stable/tutorials/qlora_finetune.html)"),
        ("Qwen-7B LoRA bf16 (r=64, all linear, checkpointing), 1 x 256 tokens", "Qwen--Qwen-7B",
         Setup(lora_r=64, seq=256, checkpointing=True, device="A100-80GB", weights_dtype="bfloat16"),
         "20.1 GB", "QwenLM/Qwen README, 'Profiling of Memory and Speed' (A100-80G, batch 1, flash attention 2)"),
        ("Qwen-7B LoRA bf16 (r=64, all linear, checkpointing), 1 x 2048 tokens", "Qwen--Qwen-7B",
         Setup(lora_r=64, seq=2048, checkpointing=True, device="A100-80GB", weights_dtype="bfloat16"),
         "23.8 GB", "QwenLM/Qwen README (as above); its trainer holds the full fp32 logits (151,936 x 2048 x 4 B = 1.2 GB, x2-3 with log-softmax), alignkit's fused head does not"),
    ):  # fmt: skip
        name, memory, tflops = gpu_spec(setup.device)
        setup = Setup(**{**setup.__dict__, "device": name, "memory": memory, "peak_tflops": tflops})
        plan = estimate(arch(model), setup)
        rows.append(
            {"config": label, "predicted_gib": round(plan.total / GiB, 1), "published": figure, "source": source}
        )
    return rows


def gpu_table() -> list[dict]:
    """The sizing table: GiB per GPU for Llama 3.1 8B / 70B, full fine-tuning, LoRA and QLoRA, 1 x 2048 tokens with
    checkpointing, on one GPU and over 8 with ZeRO-3; and the tokens/s the planner expects on an H100."""
    from alignkit.train.plan import CONFIG_DIR, Arch, GiB, Setup, estimate, gpu_spec

    rows = []
    for model in ("meta-llama--Llama-3.1-8B-Instruct", "meta-llama--Llama-3.1-70B-Instruct"):
        arch = Arch.from_config(json.loads((CONFIG_DIR / f"{model}.json").read_text()))
        for method, kw in (("full (bf16, AdamW)", {"use_peft": False}), ("LoRA r=16 (bf16)", {}),
                           ("QLoRA r=16 (nf4)", {"load_in_4bit": True})):  # fmt: skip
            name, memory, tflops = gpu_spec("H100")
            base = Setup(seq=2048, checkpointing=True, device=name, memory=memory, peak_tflops=tflops,
                         weights_dtype="bfloat16", **kw)  # fmt: skip
            one = estimate(arch, base)
            eight = estimate(arch, Setup(**{**base.__dict__, "num_processes": 8, "zero_stage": 3}))
            rows.append({"model": model.split("--")[1], "method": method, "one_gpu_gib": round(one.total / GiB, 1),
                         "zero3_8_gpus_gib": round(eight.total / GiB, 1),
                         "h100_tokens_per_s": round(one.tokens_per_s or 0)})  # fmt: skip
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", help="Labels to run (default: all).")
    p.add_argument("--json", help="Write the rows here too.")
    p.add_argument("--predict_only", action="store_true", help="Print the predictions without running anything.")
    p.add_argument("--gpu", action="store_true", help="Print the GPU tables (published figures, sizing) and stop.")
    args = p.parse_args(argv)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    if args.gpu:
        print("| configuration | predicted GiB | published | source |\n|---|---|---|---|")
        for r in published():
            print(f"| {r['config']} | {r['predicted_gib']} | {r['published']} | {r['source']} |")
        print(
            "\n| model | method | 1 GPU, GiB | 8 GPUs ZeRO-3, GiB per GPU | H100 tokens/s (1 GPU) |\n|---|---|---|---|---|"
        )
        for r in gpu_table():
            print(
                f"| {r['model']} | {r['method']} | {r['one_gpu_gib']} | {r['zero3_8_gpus_gib']} | {r['h100_tokens_per_s']:,} |"
            )
        return []
    from alignkit.models.packaged import converted_dir

    labels = args.only or list(CONFIGS)
    rows = []
    with tempfile.TemporaryDirectory(prefix="plan_check-") as tmp:
        data = write_data(Path(tmp) / "data")
        for label in labels:
            if CONFIGS[label][2] == GEMMA and not (converted_dir(GEMMA) / "config.json").is_file():
                print(f"{label}: skipped (alignkit fetch {GEMMA} first)", file=sys.stderr)
                continue
            stage, run_argv = argv_for(label, data, Path(tmp) / label)
            row = {"config": label, **predict(stage, run_argv)}
            if not args.predict_only:
                row.update(measure(stage, run_argv))
                row["error_pct"] = 100 * (row["predicted_mib"] - row["measured_mib"]) / row["measured_mib"]
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print("| configuration | predicted MiB | measured peak RSS MiB | error |")
    print("|---|---|---|---|")
    for r in rows:
        measured = f"{r['measured_mib']:.0f}" if "measured_mib" in r else "-"
        error = f"{r['error_pct']:+.1f}%" if "error_pct" in r else "-"
        print(f"| {r['config']} | {r['predicted_mib']:.0f} | {measured} | {error} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
