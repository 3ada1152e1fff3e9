"""How robust each generation/prediction fixture of the suite is across CPU kinds: ``python -m
tests.regression.margins [FIXTURE ...]``.

A test that asserts what a model generates or predicts is portable only where the model's choice does not hang on
rounding. The suite therefore asserts what alignkit guarantees whatever the weights (a reply is the greedy
continuation cut at the first stop token; two paths give the same replies on the same weights); where a test still
compares an argmax, this script measures the **top-2 logit margin** (the chosen token's logit minus the runner-up's,
min over the asserted positions) under each numerics setting the suite must pass in, each in its own process:

- the CPU's best instruction set (native: AMX on an Intel Xeon, AVX512-BF16 on an AMD Zen 4, AVX2 on older EPYCs);
- AVX-512 without AMX or bf16 (``ONEDNN_MAX_CPU_ISA=AVX512_CORE MKL_ENABLE_INSTRUCTIONS=AVX512
  ATEN_CPU_CAPABILITY=avx512``);
- AVX2 only (``ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2``).

A margin far above the differences between the compared paths (and between ISA settings: the golden spread,
``python -m tests.regression.spread``) makes the assertion portable. Where a test needs a trained model to stop at
all, the table gives how many of its replies stopped (the test needs one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
ISA_SETTINGS = {
    "native": {},
    "AVX512_CORE": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "MKL_ENABLE_INSTRUCTIONS": "AVX512",
                    "ATEN_CPU_CAPABILITY": "avx512"},
    "AVX2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
}  # fmt: skip

# The SFT run behind tests/export/test_generation_cli.py and the turn contract's end-to-end test: tiny:llama_base
# (a base vocabulary: turns end on eos) trained long enough to answer in the data's format and, mostly, stop.
GENERATION_SFT = ["--config", "recipes/tiny/sft.yaml", "--model_name_or_path", "tiny:llama_base",
                  "--load_in_4bit", "false", "--lora_r", "16", "--lora_alpha", "32", "--max_steps", "150",
                  "--save_steps", "1000", "--test_size", "0", "--disable_tqdm", "true"]  # fmt: skip


@torch.no_grad()
def greedy_trace(
    model, input_ids, max_new_tokens: int, attention_mask=None
) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy continuation of each row for ``max_new_tokens`` tokens with **no stop token** (eos and the
    generation config's stops switched off), and the top-2 logit margin at every generated position.

    ``input_ids``: (batch, prompt length). Returns (tokens, margins), each a list per row of ``max_new_tokens``
    values; a margin is the chosen logit minus the runner-up's (logit units, >= 0)."""
    config = model.generation_config
    saved = config.eos_token_id
    config.eos_token_id = None
    try:
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True,
            pad_token_id=config.pad_token_id if config.pad_token_id is not None else 0,
        )  # fmt: skip
    finally:
        config.eos_token_id = saved
    logits = torch.stack(out.logits, dim=1).float()  # (batch, new tokens, vocab)
    top2 = logits.topk(2, dim=-1).values
    tokens = out.sequences[:, input_ids.shape[1] :].tolist()
    return tokens, (top2[..., 0] - top2[..., 1]).tolist()


def cut_at_stop(tokens: list[int], stops) -> tuple[list[int], bool]:
    """``tokens`` up to (not including) the first stop token, and whether one was there."""
    for i, token in enumerate(tokens):
        if token in stops:
            return tokens[:i], True
    return tokens, False


def chat_reference(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[dict]:
    """What ``alignkit chat`` must print for ``prompts`` piped in (one conversation, history kept), computed without
    its stop handling: each turn's greedy continuation cut at the first end-of-turn token. Per turn: the printed
    ``reply``, ``stopped`` (a stop token came before ``max_new_tokens``) and the min top-2 ``margin`` up to it."""
    from alignkit.data.templates import end_of_turn_ids

    stops, messages, turns = set(end_of_turn_ids(tokenizer)), [], []
    for prompt in prompts:
        messages.append({"role": "user", "content": prompt})
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        (tokens,), (margins,) = greedy_trace(model, ids, max_new_tokens)
        kept, stopped = cut_at_stop(tokens, stops)
        reply = tokenizer.decode(kept, skip_special_tokens=True)
        messages.append({"role": "assistant", "content": reply})
        asserted = margins[: len(kept) + 1] if stopped else margins
        turns.append({"reply": " ".join(reply.split("\n")), "stopped": stopped, "margin": min(asserted)})
    return turns


def generation_prompt() -> torch.Tensor:
    """The (1, 6) prompt of tests/models/test_attention.py's generation test: fixed, so its margin is measured."""
    return torch.randint(5, 200, (1, 6), generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- the fixtures, each measured in its own process
def _train_generation_sft(tmp: Path) -> Path:
    """The tiny SFT run of GENERATION_SFT, trained once per process (chat and turn_contract share it)."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import run_recipe

    out = tmp.parent / "generation-sft"
    if not (out / "adapter_model.safetensors").is_file():
        run_recipe("sft", [*GENERATION_SFT, "--output_dir", str(out)])
    return out


def _rows() -> list[dict]:
    return [json.loads(line) for line in (REPO / "recipes/tiny/data/sft.jsonl").read_text().splitlines()]


def measure_chat(tmp: Path) -> dict:
    """tests/export/test_generation_cli.py: `alignkit chat` on three piped prompts of the tiny SFT run."""
    from alignkit.export.generate import load_for_generation

    model, tokenizer = load_for_generation(_train_generation_sft(tmp))
    turns = chat_reference(model, tokenizer, [r["messages"][1]["content"] for r in _rows()[:3]], 60)
    return {
        "stopped": f"{sum(t['stopped'] for t in turns)}/{len(turns)} stop",
        "margin": min(t["margin"] for t in turns),
    }


def measure_turn_contract(tmp: Path) -> dict:
    """tests/stages/test_turn_contract.py::test_sft_on_a_base_tokenizer_then_merge_stops_generating: the merged
    run's greedy replies to six training prompts, margins up to each one's first eos."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.export.merge import merge_adapter

    merged = merge_adapter(_train_generation_sft(tmp), tmp / "merged").output_dir
    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    stopped, margin = 0, float("inf")
    for row in _rows()[:6]:
        prompt = tokenizer.apply_chat_template(
            row["messages"][:-1], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        (tokens,), (margins,) = greedy_trace(model, prompt["input_ids"], 60, prompt["attention_mask"])
        kept, stops = cut_at_stop(tokens, {tokenizer.eos_token_id})
        stopped += stops
        margin = min(margin, *margins[: len(kept) + 1])
    return {"stopped": f"{stopped}/6 stop", "margin": margin}


def measure_ner(tmp: Path) -> dict:
    """tests/tasks/test_task_outputs.py::test_conll_file_trains_and_the_merged_ner_model_runs_in_a_pipeline: the
    label argmax of every token of its sentence, compared between the merged pipeline and the adapter model."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import run_recipe
    from tasks.test_task_outputs import CONLL, LORA_FP32

    from alignkit.models import load_trained

    data = tmp / "train.conll"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text(CONLL)
    argv = ["--config", "recipes/tiny/task_ner.yaml", "--datasets", str(data), "--test_size", "2"]
    run_recipe("task", [*argv, "--output_dir", str(tmp / "ner"), "--per_device_train_batch_size", "4", *LORA_FP32])
    model, tokenizer = load_trained(tmp / "ner")
    enc = tokenizer("Alice Smith works for Acme Corp in Paris .", return_tensors="pt")
    with torch.no_grad():
        top2 = model(**enc).logits[0].float().topk(2, dim=-1).values
    return {"margin": (top2[:, 0] - top2[:, 1]).min().item()}


def measure_embedded(_tmp: Path) -> dict:
    """tests/demo/test_embedded_model.py::test_embedded_model_answers_chat_prompts: SmolLM2-135M-Instruct's greedy
    replies to its two prompts, batched with left padding (12 tokens each)."""
    from alignkit.config.args import ModelArguments
    from alignkit.models import load_base_model, load_tokenizer

    model_args = ModelArguments(model_name_or_path="smollm2:SmolLM2-135M-Instruct")
    model, tokenizer = load_base_model(model_args), load_tokenizer(model_args)
    tokenizer.padding_side = "left"
    prompts = [[{"role": "user", "content": "What is the capital of France?"}],
               [{"role": "user", "content": "What is the capital of Germany? Answer in one word."}]]  # fmt: skip
    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    _tokens, margins = greedy_trace(model, batch["input_ids"], 12, batch["attention_mask"])
    return {"margin": min(min(m) for m in margins)}


def measure_attention(_tmp: Path) -> dict:
    """tests/models/test_attention.py::test_generation_is_unchanged: greedy tokens of the random tiny model."""
    from alignkit.config import ModelArguments
    from alignkit.models.loader import load_base_model

    model = load_base_model(ModelArguments(model_name_or_path="tiny:llama"))
    _tokens, (margins,) = greedy_trace(model, generation_prompt(), 5)
    return {"margin": min(margins)}


def _preference(stage: str):
    def measure(tmp: Path) -> dict:
        """tests/stages/test_methods.py: the stage trained on the learnable preference; its held-out pairs ranked by
        the stage's own score (implicit reward for KTO, average log-prob for ORPO/SimPO, the reward model's score),
        and trl's final eval accuracy on its test split (what the test asserts, >= 0.9)."""
        sys.path.insert(0, str(REPO / "tests"))
        from stages.test_methods import completion_logp, learn, preference_rows

        from alignkit.export.generate import load_for_generation

        tmp.mkdir(parents=True, exist_ok=True)
        out, _start, end = learn(stage, tmp)
        held_out = preference_rows(16, seed=1)
        if stage == "reward":
            from alignkit.export.reward_model import RewardModel

            scorer = RewardModel(out)
            prompts = [r["prompt"] for r in held_out]
            chosen = scorer.score(prompts, [r["chosen"] for r in held_out])
            rejected = scorer.score(prompts, [r["rejected"] for r in held_out])
            margins = [c - r for c, r in zip(chosen, rejected)]
            accuracy = end["eval_accuracy"]
        else:
            model, tokenizer = load_for_generation(out)

            def score(row, column):
                logp = completion_logp(model, tokenizer, row["prompt"], row[column])
                if stage == "kto":
                    with model.disable_adapter():
                        return logp - completion_logp(model, tokenizer, row["prompt"], row[column])
                return logp / len(tokenizer(row[column], add_special_tokens=False)["input_ids"])

            margins = [score(r, "chosen") - score(r, "rejected") for r in held_out]
            accuracy = end.get("eval_rewards/accuracies")
        wins = sum(m > 0 for m in margins)
        return {"margin": min(abs(m) for m in margins), "stopped": f"{wins}/16 won, eval acc {accuracy}"}

    return measure


MEASURES = {
    "chat": measure_chat, "turn_contract": measure_turn_contract, "attention_generate": measure_attention,
    "ner_pipeline": measure_ner, "embedded_left_padding": measure_embedded,
    **{f"preference_{stage}": _preference(stage) for stage in ("kto", "orpo", "simpo", "reward")},
}  # fmt: skip


def _child(names: list[str]) -> None:
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory(prefix="alignkit-margins-") as tmp:
        for name in names:
            import contextlib

            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
                results[name] = MEASURES[name](Path(tmp) / name)
    print("MARGINS-JSON " + json.dumps(results))


def main(names: list[str]) -> None:
    from tests.regression.golden import describe_machine, machine_facts

    names = names or list(MEASURES)
    print(describe_machine(machine_facts()))
    table: dict[str, dict] = {}
    for label, caps in ISA_SETTINGS.items():
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", **caps}
        done = subprocess.run([sys.executable, "-m", "tests.regression.margins", "--child", *names], cwd=REPO,
                              env=env, capture_output=True, text=True)  # fmt: skip
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("MARGINS-JSON ")), None)
        if line is None:
            sys.exit(f"{label} failed:\n{done.stderr[-3000:]}")
        table[label] = json.loads(line.split(" ", 1)[1])
    print(f"\n{'fixture':<24}" + "".join(f"{label:>44}" for label in ISA_SETTINGS))
    for name in names:
        cells = []
        for label in ISA_SETTINGS:
            r = table[label][name]
            cells.append(f"{r['margin']:.4g}" + (f" ({r['stopped']})" if "stopped" in r else ""))
        print(f"{name:<24}" + "".join(f"{c:>44}" for c in cells))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _child(sys.argv[2:])
    else:
        main(sys.argv[1:])
