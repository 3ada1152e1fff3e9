"""Bad input, across stages and tasks, fails with one clear error (where: file/row/key; and a 'Fix') before any
training step, and leaves everything it was given untouched.

'Before any training step' is checked through the output dir: the run loop writes alignkit_run.json (status
running) right before trainer.train(), so an unchanged snapshot of the case's folder (recipe, data, output dir)
means training never started, and nothing the user had there was replaced or deleted.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from conftest import TINY_DATA, run_recipe

from alignkit.errors import ConfigError, DataError, PreflightError


def _rows(name: str, n: int = 8) -> list[dict]:
    return [json.loads(line) for line in (TINY_DATA / name).read_text().splitlines()[:n]]


SFT_ROWS, DPO_ROWS, CPT_ROWS = _rows("sft.jsonl"), _rows("dpo.jsonl"), _rows("cpt.jsonl")
NER_ROWS, QA_ROWS, CLS_ROWS = _rows("tasks/ner.jsonl"), _rows("tasks/qa.jsonl"), _rows("tasks/cls.jsonl")
LLM = dict(model_name_or_path="tiny:llama", lora_r=4, lora_alpha=8, max_steps=2, per_device_train_batch_size=2,
           save_steps=1, disable_tqdm=True)  # fmt: skip
BERT = dict(LLM, model_name_or_path="tiny:bert", max_length=32)
BASE = {
    "sft": dict(LLM, max_length=128, assistant_only_loss=True),
    "dpo": dict(LLM, max_length=128),
    "cpt": dict(LLM, block_size=32),
    "token_cls": dict(BERT, task="token_cls", label_list=["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]),
    "qa": dict(BERT, task="qa", max_length=64, doc_stride=16),
    "seq_cls": dict(BERT, task="seq_cls", label_list=["sports", "food", "tech"]),
}
GOOD_ROWS = dict(sft=SFT_ROWS, dpo=DPO_ROWS, cpt=CPT_ROWS, token_cls=NER_ROWS, qa=QA_ROWS, seq_cls=CLS_ROWS)
RECIPE = {"sft": "sft", "dpo": "dpo", "cpt": "cpt", "token_cls": "task", "qa": "task", "seq_cls": "task"}


def edit_row(index: int, change: Callable[[dict], None]) -> Callable[[list[dict]], list[dict]]:
    def apply(rows):
        rows = copy.deepcopy(rows)
        change(rows[index])
        return rows

    return apply


def _set(path, value):
    """Set rows[...] by a path of keys/indices, e.g. _set(("messages", 1, "role"), "human")."""

    def change(row):
        target = row
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return change


def checkpoint_without_manifest(case_dir: Path, out: Path, mp) -> None:
    # what a kill during a save leaves: the files written so far, and no completion manifest
    (out / "checkpoint-2").mkdir()
    (out / "checkpoint-2" / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    (out / "checkpoint-2" / "optimizer.pt").write_bytes(b"\0" * 32)


def env_typo(name: str, value: str) -> Callable:
    """An alignkit environment variable set to a value it does not take (read once per process: cache cleared)."""

    def prepare(case_dir: Path, out: Path, mp) -> None:
        from alignkit import runtime

        mp.setenv(name, value)
        runtime.cpu_mixed_precision.cache_clear()  # a refusal is not cached: the next call reads the restored value

    return prepare


def finished_run(case_dir: Path, out: Path, mp) -> None:
    (out / "alignkit_run.json").write_text(json.dumps({"status": "finished", "stage": "sft"}))
    (out / "adapter_model.safetensors").write_bytes(b"weights of a finished run")


def output_dir_under_a_file(case_dir: Path, out: Path, mp) -> None:
    (case_dir / "a_file").write_text("not a folder")


def junk_template_file(case_dir: Path, out: Path, mp) -> None:
    (case_dir / "t.txt").write_text("x")


def crashed_run(case_dir: Path, out: Path, mp) -> None:
    (case_dir / "crashed").mkdir()
    (case_dir / "crashed" / "alignkit_run.json").write_text(
        json.dumps({"format": 1, "status": "running", "stage": "sft"})
    )


def ner_adapter_output(case_dir: Path, out: Path, mp) -> None:
    folder = case_dir / "ner_out"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "tiny:bert", "r": 4}))
    record = {"format": 1, "status": "finished", "stage": "token_cls", "base_model_args": {"model_name_or_path": "tiny:bert"},
              "lineage": [{"stage": "token_cls", "task": "token_cls", "adapter": "lora"}]}  # fmt: skip
    (folder / "alignkit_run.json").write_text(json.dumps(record))


def no_hub_token(case_dir: Path, out: Path, mp) -> None:
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        mp.setenv(name, "")
        mp.delenv(name)
    mp.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(case_dir / "no-token-file"))


def hub_token_set(case_dir: Path, out: Path, mp) -> None:
    mp.setenv("HF_TOKEN", "hf_validLookingTokenButTheHubIsOffline")  # the suite runs with HF_HUB_OFFLINE=1


def fsdp_launch(case_dir: Path, out: Path, mp) -> None:
    mp.setenv("ACCELERATE_USE_FSDP", "true")


@dataclass
class Case:
    id: str
    stage: str
    error: type[Exception]
    says: tuple[str, ...]  # the message names these (file/row/key); {data}, {recipe}, {out}, {case} are filled in
    config: dict = field(default_factory=dict)
    rows: Callable[[list[dict]], list[dict]] | None = None
    data_text: str | None = None  # raw file content instead of rows
    data_bytes: bytes | None = None  # raw bytes instead of rows
    cli: tuple[str, ...] = ()
    prepare: Callable | None = None
    recipe_text: str | None = None
    suffix: str = ".jsonl"  # the data file's


CASES = [
    # ---------------------------------------------------------------- data (SFT)
    Case("sft-bad-json-line", "sft", DataError, ("{data}", "row 3", "not valid JSON"),
         data_text="".join(json.dumps(r) + "\n" for r in SFT_ROWS[:2]) + '{"messages": [{"role": "user",\n'),
    Case("sft-empty-split", "sft", DataError, ("{data}", "no rows"), data_text="\n"),
    Case("sft-missing-column", "sft", DataError, ("{data}", "missing columns", "messages"),
         rows=lambda rows: [{"question": "1 + 1?", "answer": "2"} for _ in rows]),
    Case("sft-wrong-role", "sft", DataError, ("{data}", "row 2", "'human'"), rows=edit_row(1, _set(("messages", 1, "role"), "human"))),
    Case("sft-ends-on-user", "sft", DataError, ("{data}", "row 1", "ends on 'user'"),
         rows=edit_row(0, lambda r: r["messages"].pop())),
    Case("sft-system-not-first", "sft", DataError, ("{data}", "row 4", "system message"),
         rows=edit_row(3, lambda r: r["messages"].insert(2, {"role": "system", "content": "be brief"}))),
    Case("sft-empty-content", "sft", DataError, ("{data}", "row 5", "empty content"),
         rows=edit_row(4, _set(("messages", 2, "content"), "  "))),
    Case("sft-empty-completion", "sft", DataError, ("{data}", "row 2", "'completion'"),
         rows=lambda rows: [{"prompt": "1 + 1 =", "completion": " 2"}, {"prompt": "2 + 2 =", "completion": ""}]),
    Case("sft-data-file-missing", "sft", DataError, ("{case}/nowhere.jsonl", "not found"),
         config=dict(datasets=[{"path": "{case}/nowhere.jsonl"}])),
    Case("sft-test-size-too-big", "sft", DataError, ("test_size",), config=dict(test_size=8)),
    Case("sft-every-row-beyond-max-length", "sft", DataError, ("train split", "max_length", "no rows left"), config=dict(max_length=24)),
    # ---------------------------------------------------------------- config
    Case("yaml-misspelled-key", "sft", ConfigError, ("{recipe}", "'learning_rat'", "Did you mean 'learning_rate'"),
         config=dict(learning_rat=1e-3)),
    Case("cli-misspelled-key", "sft", ConfigError, ("command line", "'lora_alpah'", "Did you mean 'lora_alpha'"),
         cli=("--lora_alpah", "16")),
    Case("yaml-syntax", "sft", ConfigError, ("{recipe}", "not valid YAML"), recipe_text="model_name_or_path: [tiny:llama\n"),
    Case("no-model", "sft", ConfigError, ("model_name_or_path",), config=dict(model_name_or_path=None)),
    Case("unknown-tiny-model", "sft", ConfigError, ("model_name_or_path", "tiny:gpt2"), config=dict(model_name_or_path="tiny:gpt2")),
    Case("4bit-without-peft", "sft", ConfigError, ("load_in_4bit", "use_peft"), config=dict(load_in_4bit=True, use_peft=False)),
    Case("4bit-under-fsdp-uint8-storage", "sft", ConfigError, ("FSDP", "bnb_4bit_quant_storage"),
         config=dict(load_in_4bit=True, bnb_4bit_quant_storage="uint8"), prepare=fsdp_launch),
    Case("template-without-generation-marks", "sft", ConfigError, ("assistant_only_loss", "chat_template"),
         config=dict(chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")),
    # ---------------------------------------------------------------- model / adapter
    Case("lora-target-not-in-model", "sft", ConfigError, ("lora_target_modules", "q_projj"),
         config=dict(lora_target_modules=["q_projj", "v_proj"])),
    Case("pickle-only-weights", "sft", PreflightError, ("{pickle_model}", "pickle", "allow_pickle_weights"),
         config=dict(model_name_or_path="{pickle_model}")),
    # ---------------------------------------------------------------- output dir, resume, disk, Hub
    Case("output-dir-unwritable", "sft", PreflightError, ("output_dir", "{case}/a_file/out", "not writable"),
         config=dict(output_dir="{case}/a_file/out"), prepare=output_dir_under_a_file),
    Case("env-cpu-amp-typo", "sft", ConfigError, ("ALIGNKIT_CPU_AMP='fast'", "auto, off, on"),
         prepare=env_typo("ALIGNKIT_CPU_AMP", "fast")),
    Case("env-allocator-typo", "sft", ConfigError, ("ALIGNKIT_CPU_ALLOCATOR='sytem'", "Did you mean 'system'"),
         prepare=env_typo("ALIGNKIT_CPU_ALLOCATOR", "sytem")),
    Case("finished-run-without-overwrite", "sft", PreflightError, ("{out}", "finished", "overwrite_output_dir"),
         prepare=finished_run),
    Case("unfinished-checkpoints-without-resume", "sft", PreflightError, ("{out}", "resume_from_checkpoint"),
         prepare=checkpoint_without_manifest),
    Case("resume-without-checkpoint", "sft", PreflightError, ("resume_from_checkpoint", "{out}", "no checkpoint"),
         config=dict(resume_from_checkpoint=True)),
    Case("resume-latest-only-incomplete", "sft", PreflightError, ("resume_from_checkpoint", "checkpoint-2", "cut short"),
         config=dict(resume_from_checkpoint=True), prepare=checkpoint_without_manifest),
    Case("resume-path-incomplete", "sft", PreflightError, ("{out}/checkpoint-2", "incomplete"),
         config=dict(resume_from_checkpoint="{out}/checkpoint-2"), prepare=checkpoint_without_manifest),
    Case("disk-below-minimum", "sft", PreflightError, ("min_free_disk_gb",), config=dict(min_free_disk_gb=1e9)),
    Case("checkpoints-will-not-fit", "sft", PreflightError, ("planned checkpoints", "save_total_limit"),
         config=dict(use_peft=False, max_steps=10**9, save_steps=1)),
    Case("push-to-hub-without-token", "sft", PreflightError, ("push_to_hub", "token", "HF_TOKEN"),
         config=dict(push_to_hub=True), prepare=no_hub_token),
    Case("push-to-hub-unreachable", "sft", PreflightError, ("push_to_hub", "could not be reached"),
         config=dict(push_to_hub=True), prepare=hub_token_set),
    # ---------------------------------------------------------------- DPO, CPT
    Case("dpo-chosen-equals-rejected", "dpo", DataError, ("{data}", "row 2", "identical"),
         rows=edit_row(1, lambda r: r.update(rejected=r["chosen"]))),
    Case("dpo-missing-rejected", "dpo", DataError, ("{data}", "missing columns", "rejected"),
         rows=lambda rows: [{k: v for k, v in r.items() if k != "rejected"} for r in rows]),
    Case("dpo-wrong-role", "dpo", DataError, ("{data}", "row 3", "'gpt'"), rows=edit_row(2, _set(("chosen", 0, "role"), "gpt"))),
    Case("cpt-empty-text", "cpt", DataError, ("{data}", "row 4", "'text'"), rows=edit_row(3, _set(("text",), ""))),
    # ---------------------------------------------------------------- task heads
    Case("ner-tag-not-in-label-list", "token_cls", DataError, ("{data}", "row 3", "B-MISC"),
         rows=edit_row(2, lambda r: r["ner_tags"].__setitem__(0, "B-MISC"))),
    Case("ner-tags-and-words-differ", "token_cls", DataError, ("{data}", "row 1", "tags"),
         rows=edit_row(0, lambda r: r["ner_tags"].pop())),
    Case("qa-answer-start-mismatch", "qa", DataError, ("{data}", "row 2", "answer_start"),
         rows=edit_row(1, lambda r: r["answers"]["answer_start"].__setitem__(0, r["answers"]["answer_start"][0] + 3))),
    # labels as ids (a column holds one type in every row: names and ids are not mixed in one file)
    Case("cls-label-id-out-of-range", "seq_cls", DataError, ("{data}", "row 1", "outside"),
         rows=lambda rows: [{**r, "label": 7 if i == 0 else ["sports", "food", "tech"].index(r["label"])} for i, r in enumerate(rows)]),
    Case("cls-label-names-and-ids-mixed", "seq_cls", DataError, ("{data}", "row 2", "'label' is a number (1) here but text on line 1"),
         rows=edit_row(1, _set(("label",), 1))),
    Case("cls-without-label-list", "seq_cls", ConfigError, ("label_list",), config=dict(label_list=None)),
    # ---------------------------------------------------------------- values out of range (alignkit.config.ranges)
    *[Case(f"range-{stage}-{key}-{value}", stage, ConfigError, (key, "out of range"), config={key: value}) for stage, key, value in (
        ("sft", "learning_rate", 0), ("sft", "learning_rate", -1e-3), ("sft", "lora_alpha", 0), ("sft", "lora_r", 0),
        ("sft", "lora_dropout", 1.5), ("sft", "max_steps", 0), ("sft", "max_steps", -2),
        ("sft", "gradient_accumulation_steps", 0), ("sft", "per_device_train_batch_size", 0),
        ("sft", "per_device_eval_batch_size", 0), ("sft", "save_steps", 0), ("sft", "logging_steps", 0),
        ("sft", "warmup_steps", -1), ("sft", "weight_decay", -0.1), ("sft", "max_grad_norm", -1.0),
        ("sft", "save_total_limit", 0), ("sft", "seed", -1), ("sft", "test_size", -1), ("sft", "max_length", 0),
        ("sft", "adam_beta1", 1.0), ("sft", "adam_epsilon", 0), ("sft", "max_train_samples", 0),
        ("sft", "num_train_epochs", 0), ("cpt", "block_size", 0), ("cpt", "block_size", 1), ("dpo", "beta", -0.1),
        ("dpo", "beta", 0), ("dpo", "label_smoothing", 0.7), ("dpo", "max_length", -5), ("token_cls", "learning_rate", 0),
    )],
    Case("epochs-zero-without-max-steps", "sft", ConfigError, ("num_train_epochs", "out of range"),
         config=dict(max_steps=-1, num_train_epochs=0)),
    Case("eval-without-eval-data", "sft", ConfigError, ("eval_strategy", "no evaluation data", "test_size"),
         config=dict(test_size=0, eval_strategy="steps")),
    Case("wrong-type", "sft", ConfigError, ("max_steps", "'ten'", "int"), config=dict(max_steps="ten")),
    Case("yaml-duplicate-key", "sft", ConfigError, ("{recipe}", "'learning_rate' is set twice", "line 2", "line 3"),
         recipe_text="model_name_or_path: tiny:llama\nlearning_rate: 1e-3\nlearning_rate: 5e-3\n"),
    Case("yaml-not-a-mapping", "sft", ConfigError, ("{recipe}", "mapping"), recipe_text="- model_name_or_path\n"),
    Case("recipe-file-missing", "sft", ConfigError, ("{case}/nope.yaml", "not found"), cli=("--config", "{case}/nope.yaml")),
    Case("chat-template-path-missing", "sft", ConfigError, ("chat_template", "/no/such/template.jinja", "does not exist"),
         config=dict(chat_template="/no/such/template.jinja")),
    Case("chat-template-neither", "sft", ConfigError, ("chat_template", "chatmll"), config=dict(chat_template="chatmll")),
    Case("lora-targets-one-string", "sft", ConfigError, ("lora_target_modules", "foo_proj", "matches no module"),
         config=dict(lora_target_modules="foo_proj")),
    Case("lora-targets-comma-string", "sft", ConfigError, ("lora_target_modules", "write a list"),
         config=dict(lora_target_modules="q_proj,v_proj")),
    Case("weight-not-a-number", "sft", ConfigError, ("weight", "'two'", "not a number"),
         config=dict(datasets=[{"path": "{data}", "weight": "two"}])),
    Case("weight-zero", "sft", ConfigError, ("weight", "not a number in (0, 10000)"), config=dict(datasets=[{"path": "{data}", "weight": 0}])),
    Case("weight-keeps-no-rows", "sft", DataError, ("{data}", "weight 0.005 keeps 0 of its 8 rows", "at least 0.125"),
         config=dict(datasets=[{"path": "{data}", "weight": 0.005}])),
    Case("dataset-key-unknown", "sft", ConfigError, ("datasets[0]", "'wieght'", "Did you mean 'weight'"),
         config=dict(datasets=[{"path": "{data}", "wieght": 2}])),
    Case("non-utf8-byte", "sft", DataError, ("{data}", "row 2", "not UTF-8", "byte"),
         data_bytes=(json.dumps(SFT_ROWS[0]) + "\n").encode() + b'{"messages": "caf\xe9"}\n'),
    # a content of another type than the other rows' text: stopped as the file is read (datasets would change it)
    Case("content-not-text", "sft", DataError, ("{data}", "row 3", "'messages[].content' is a number (42) here but text on line 1"),
         rows=edit_row(2, _set(("messages", 2, "content"), 42))),
    Case("content-a-list", "sft", DataError, ("{data}", "row 1", "'messages[].content' is a list (['a', 'b']) here but text on line 1"),
         rows=edit_row(0, _set(("messages", 1, "content"), ["a", "b"]))),
    Case("content-never-text", "sft", DataError, ("{data}", "row 1", "not text (a int"),
         rows=lambda rows: [{"messages": [{**m, "content": 7} for m in r["messages"]]} for r in rows]),
    Case("row-number-is-the-file-line", "sft", DataError, ("{data}", "row 4", "'human'"),
         data_text="".join(json.dumps(r) + "\n" for r in SFT_ROWS[:2]) + "\n"
         + json.dumps({"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "yo"}]}) + "\n"),
    Case("task-key-of-another-task", "token_cls", ConfigError, ("doc_stride", "task qa"), config=dict(doc_stride=8)),
    Case("task-unknown", "token_cls", ConfigError, ("task", "'ner'", "is not a task"), config=dict(task="ner")),
    Case("stage-key-of-another-stage", "sft", ConfigError, ("'beta'", "key of the dpo, kto", "alignkit dpo"), config=dict(beta=0.1)),
    Case("task-key-in-stage-recipe", "sft", ConfigError, ("'task'", "task recipe"), cli=("--task", "qa")),
    # ---------------------------------------------------------------- found by a fresh user's session
    Case("sft-on-an-encoder", "sft", ConfigError, ("tiny:bert", "not a causal", "alignkit task"), config=dict(model_name_or_path="tiny:bert")),
    Case("dpo-from-a-task-adapter", "dpo", PreflightError, ("{case}/ner_out", "token_cls adapter", "causal_lm head"),
         config=dict(model_name_or_path="{case}/ner_out"), prepare=ner_adapter_output),
    Case("start-from-an-unfinished-run", "dpo", ConfigError, ("{case}/crashed", "did not finish"),
         config=dict(model_name_or_path="{case}/crashed"), prepare=crashed_run),
    Case("model-path-is-a-file", "sft", ConfigError, ("{data}", "is a file, not a model"), config=dict(model_name_or_path="{data}")),
    Case("hub-id-without-the-hub", "sft", ConfigError, ("nosuchorg/nosuchmodel", "the Hub cannot be reached",
                                                         "not in the local Hugging Face cache"),
         config=dict(model_name_or_path="nosuchorg/nosuchmodel")),
    Case("chat-template-file-without-jinja", "sft", ConfigError, ("{case}/t.txt", "holds no Jinja"),
         config=dict(chat_template="{case}/t.txt", assistant_only_loss=False), prepare=junk_template_file),
    Case("chat-template-bad-jinja", "sft", ConfigError, ("chat_template", "not a valid Jinja template", "line 1"),
         config=dict(chat_template="{% for m in messages %}{{ m.content", assistant_only_loss=False)),
    Case("chat-template-a-folder", "sft", ConfigError, ("chat_template", "is a folder"), config=dict(chat_template="{case}")),
    Case("range-qa-doc_stride-0", "qa", ConfigError, ("doc_stride", "out of range"), config=dict(doc_stride=0)),
    Case("range-generation-beams-0", "token_cls", ConfigError, ("generation_num_beams", "out of range"),
         config=dict(generation_num_beams=0)),
    Case("range-test-size-fractional-count", "sft", ConfigError, ("test_size", "out of range"), config=dict(test_size=2.5)),
    Case("weight-infinite", "sft", ConfigError, ("weight", "not a number in (0, 10000)"),
         config=dict(datasets=[{"path": "{data}", "weight": float("inf")}])),
    Case("test-split-on-one-file", "sft", DataError, ("{data}", "is one file", "test_size"),
         config=dict(datasets=[{"path": "{data}", "test_split": "validation"}])),
    Case("cli-number-key-without-value", "sft", ConfigError, ("--max_steps needs a value",), cli=("--max_steps",)),
    # ---------------------------------------------------------------- choices, lengths, CSV rows
    Case("dpo-loss-type-unknown", "dpo", ConfigError, ("loss_type", "'sigmoidd'", "Did you mean 'sigmoid'"),
         config=dict(loss_type="sigmoidd")),
    Case("format-unknown", "sft", ConfigError, ("format", "'alpacca'", "Did you mean 'alpaca'"),
         config=dict(datasets=[{"path": "{data}", "format": "alpacca"}])),
    Case("sharegpt-role-unknown", "sft", DataError, ("{data}", "row 2", "from='bot'", "roles: {bot: assistant}"),
         rows=lambda rows: [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt" if i != 1 else "bot",
                                                "value": "Hello"}]} for i in range(8)]),
    Case("sft-assistant-only-loss-on-text-pairs", "sft", ConfigError, ("assistant_only_loss", "assistant_only_loss: false"),
         rows=lambda rows: [{"prompt": f"{i} + 1 =", "completion": f" {i + 1}"} for i in range(8)]),
    Case("sft-loss-type-unknown", "sft", ConfigError, ("loss_type", "'dpo'", "['nll', 'dft'"), config=dict(loss_type="dpo")),
    Case("report-to-unknown", "sft", ConfigError, ("report_to", "'wandbb'", "Did you mean 'wandb'"), config=dict(report_to="wandbb")),
    Case("cpt-block-size-beyond-positions", "cpt", PreflightError, ("block_size", "100000", "max_position_embeddings 512"),
         config=dict(block_size=100000)),
    Case("ner-max-length-beyond-positions", "token_cls", PreflightError, ("max_length", "max_position_embeddings 512"),
         config=dict(max_length=1000)),
    Case("csv-row-number-is-the-file-line", "sft", DataError, ("{data}", "row 6", "'completion'"), suffix=".csv",
         config=dict(assistant_only_loss=False),
         data_text='prompt,completion\n1 + 1 =,two\n\n"a prompt on\ntwo lines",three\n2 + 2 =,\n'),
]  # fmt: skip


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(folder.rglob("*"))
    }


@pytest.fixture(scope="module")
def pickle_model(tmp_path_factory, tiny_llama):
    """The tiny Llama with its weights as a pickle (pytorch_model.bin) only."""
    import torch
    from safetensors.torch import load_file

    folder = tmp_path_factory.mktemp("pickle_model")
    for item in Path(tiny_llama).iterdir():
        if item.suffix != ".safetensors":
            shutil.copy(item, folder / item.name)
    torch.save(load_file(str(Path(tiny_llama) / "model.safetensors")), folder / "pytorch_model.bin")
    return folder


def test_table_covers_stages_tasks_and_at_least_60_cases():
    assert len(CASES) >= 60
    assert {c.stage for c in CASES} == set(BASE)
    assert len({c.id for c in CASES}) == len(CASES)


def _set_up(case: Case, tmp_path: Path, pickle_model: Path, monkeypatch) -> tuple[dict[str, str], list[str]]:
    """Write the case's data, recipe and output dir under ``tmp_path``; return the names its messages are filled
    with and the recipe's argv."""
    out, data = tmp_path / "out", tmp_path / "data" / f"{case.stage}{case.suffix}"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file: must survive")
    data.parent.mkdir()
    names = {"case": str(tmp_path), "out": str(out), "data": str(data), "pickle_model": str(pickle_model)}
    rows = (case.rows or (lambda r: r))(GOOD_ROWS[case.stage])
    if case.data_bytes is not None:
        data.write_bytes(case.data_bytes)
    else:
        data.write_text(case.data_text if case.data_text is not None else "".join(json.dumps(r) + "\n" for r in rows))
    config = {**BASE[case.stage], "datasets": [{"path": str(data)}], "output_dir": str(out), **case.config}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(case.recipe_text or _fill(yaml.safe_dump(config), names))
    names["recipe"] = str(recipe)
    if case.prepare:
        case.prepare(tmp_path, out, monkeypatch)
    return names, ["--config", str(recipe), *(_fill(a, names) for a in case.cli)]


def _says_where_and_how(case: Case, message: str, names: dict[str, str]) -> None:
    for fragment in case.says:
        assert _fill(fragment, names) in message, f"{case.id}: {fragment!r} not in: {message}"
    assert "Fix" in message, f"{case.id}: no fix in: {message}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_fails_before_training_with_a_clear_error(case, tmp_path, pickle_model, monkeypatch):
    names, argv = _set_up(case, tmp_path, pickle_model, monkeypatch)
    before = snapshot(tmp_path)

    with pytest.raises(case.error) as raised:
        run_recipe(RECIPE[case.stage], argv)

    _says_where_and_how(case, str(raised.value), names)
    assert snapshot(tmp_path) == before, f"{case.id}: the case's files changed"


# A sample through the README's launcher: every stage and task kind, data, config, range, hand-off and output-dir
# errors; one process, and two (DDP and ZeRO-3) for two of them. The launcher must exit 2 with the child's message
# and no traceback, and a hub token given on the command line and in HF_TOKEN must not appear anywhere.
LAUNCHED = {
    "sft-wrong-role": 1, "sft-bad-json-line": 1, "non-utf8-byte": 1, "yaml-duplicate-key": 1,
    "cli-misspelled-key": 1, "chat-template-path-missing": 1, "range-test-size-fractional-count": 1,
    "lora-target-not-in-model": 1, "finished-run-without-overwrite": 1, "dpo-chosen-equals-rejected": 1,
    "cpt-empty-text": 1, "ner-tag-not-in-label-list": 1, "range-qa-doc_stride-0": 1, "sft-on-an-encoder": 1,
    "dpo-wrong-role": "ddp", "sft-every-row-beyond-max-length": "zero3",
}  # fmt: skip
SECRET = "hf_" + "launcherLeakProbe0123456789"


# Through `accelerate launch` itself: one case per recipe (sft, dpo, cpt, task) and both multi-rank configs; the
# rest of the sample runs through the same run_cli the recipe's __main__ calls, in this process (each launch costs
# two interpreters importing torch/trl: ~10 s).
THROUGH_ACCELERATE = {"sft-bad-json-line", "cpt-empty-text", "range-qa-doc_stride-0", "dpo-wrong-role",
                      "sft-every-row-beyond-max-length"}  # fmt: skip


def test_launched_sample_is_big_and_known():
    assert len(LAUNCHED) >= 10 and set(LAUNCHED) <= {c.id for c in CASES}
    assert THROUGH_ACCELERATE <= set(LAUNCHED)
    through = [c for c in CASES if c.id in THROUGH_ACCELERATE]
    assert {RECIPE[c.stage] for c in through} == set(RECIPE.values())  # every recipe under the launcher
    assert {LAUNCHED[c.id] for c in through} == set(LAUNCHED.values())  # one process, DDP and ZeRO-3


def _said_once_without_a_traceback_or_the_secret(case: Case, code, said: str, names: dict[str, str]) -> None:
    assert code == 2, f"{case.id}: exit {code}\n{said[-3000:]}"
    assert "Traceback" not in said and "CalledProcessError" not in said and "ChildFailedError" not in said, said[-3000:]
    assert SECRET not in said, f"{case.id}: the hub token was printed"
    errors = [line for line in said.splitlines() if line.startswith("alignkit: ")]
    assert len(errors) == 1, f"{case.id}: one message, from rank 0: {errors}"
    assert errors[0].startswith(f"alignkit: {case.error.__name__}: "), errors
    _says_where_and_how(case, errors[0], names)


@pytest.mark.parametrize("case", [c for c in CASES if c.id in set(LAUNCHED) - THROUGH_ACCELERATE], ids=lambda c: c.id)
def test_bad_input_through_run_cli_exits_2_with_one_line_and_no_secret(
    case, tmp_path, pickle_model, monkeypatch, capfd
):
    """The rest of the launched sample: the recipe's main under run_cli (what its __main__ runs), in this process."""
    import runpy

    from conftest import REPO

    from alignkit.errors import run_cli

    names, argv = _set_up(case, tmp_path, pickle_model, monkeypatch)
    before = snapshot(tmp_path)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    recipe = runpy.run_path(str(REPO / "recipes" / f"{RECIPE[case.stage]}.py"), run_name="alignkit_recipe")
    capfd.readouterr()
    with pytest.raises(SystemExit) as exited:
        run_cli(recipe["main"], [*argv, "--hub_token", SECRET])
    out, err = capfd.readouterr()
    _said_once_without_a_traceback_or_the_secret(case, exited.value.code, out + err, names)
    assert snapshot(tmp_path) == before, f"{case.id}: the case's files changed"


@pytest.mark.parametrize("case", [c for c in CASES if c.id in THROUGH_ACCELERATE], ids=lambda c: c.id)
def test_bad_input_through_accelerate_launch_exits_2_without_a_traceback_or_a_secret(
    case, tmp_path, pickle_model, monkeypatch
):
    import os
    import subprocess
    import sys

    from conftest import REPO

    names, argv = _set_up(case, tmp_path, pickle_model, monkeypatch)
    before = snapshot(tmp_path)
    ranks = LAUNCHED[case.id]
    launcher = ["--num_processes", "1", "--cpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if ranks != 1:
        import socket

        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            port = str(free.getsockname()[1])
        launcher = [
            "--config_file",
            f"accelerate_configs/{ranks}.yaml",
            "--num_processes",
            "2",
            "--main_process_port",
            port,
        ]
    cmd = ["accelerate", "launch", *launcher, f"recipes/{RECIPE[case.stage]}.py", *argv, "--hub_token", SECRET]
    env = {**os.environ, "HF_TOKEN": SECRET, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)

    _said_once_without_a_traceback_or_the_secret(case, done.returncode, done.stdout + done.stderr, names)
    assert snapshot(tmp_path) == before, f"{case.id}: the case's files changed"


def _fill(text: str, names: dict[str, str]) -> str:
    for key, value in names.items():
        text = text.replace("{" + key + "}", value)
    return text
