"""SFT stage: recipes/sft.py on the tiny Llama. Loss falls with QLoRA and LoRA, packed and unpacked; only assistant
tokens carry labels; packed rows do not attend to each other; the chat template and eos/pad are saved with the
adapter and reload identically; `accelerate launch` runs it end to end."""

import json
import shutil

import pytest
import torch
from conftest import accelerate_launch_one_process, run_recipe, train_losses, write_jsonl
from transformers import AutoTokenizer

from alignkit.config import SFTConfig, parse_recipe
from alignkit.data.templates import CHATML
from alignkit.models.tokenizer import load_tokenizer

TINY = ["--config", "recipes/tiny/sft.yaml", "--test_size", "0", "--disable_tqdm", "true"]
CHAT = [
    {"role": "system", "content": "You are a careful calculator."},
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "12 + 30 = 42.\nANSWER: 42"},
]


@pytest.fixture(scope="module")
def smollm2_like(tmp_path_factory, tiny_llama):
    """The tiny Llama with a tokenizer shaped like SmolLM2's: pad == eos == <|im_end|>, ChatML without
    {% generation %} marks. The contract fixes the pad; the template it never replaces: with assistant_only_loss the
    recipe names one that marks assistant turns (chat_template: chatml, as recipes/smollm2/ do), or is refused."""
    path = tmp_path_factory.mktemp("smollm2_like")
    shutil.copytree(tiny_llama, path, dirs_exist_ok=True)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": config["eos_token"]}))
    (path / "chat_template.jinja").write_text(CHATML.replace("{% generation %}", "").replace("{% endgeneration %}", ""))
    return path


def _falls(losses):
    third = max(1, len(losses) // 3)
    return sum(losses[-third:]) / third < sum(losses[:third]) / third - 0.05


def _label_spans(batch, tokenizer):
    """Per ChatML turn of every collated row: (role, turn token ids, turn labels)."""
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        cuts = [i for i, t in enumerate(ids) if t == start]
        assert cuts, "no ChatML turn in the row"
        assert all(label == -100 for label in labels[: cuts[0]])
        for a, b in zip(cuts, cuts[1:] + [len(ids)]):
            role = tokenizer.decode(ids[a:b])[len("<|im_start|>") :].split("\n", 1)[0]
            yield role, ids[a:b], labels[a:b]


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_assistant_only_loss_labels_no_user_or_system_token(packing, trainers, tmp_path, capsys):
    out = tmp_path / "out"
    metrics = run_recipe("sft", [*TINY, "--output_dir", str(out), "--packing", str(packing), "--label_preview"])
    assert metrics == {} and not out.exists(), (
        "label_preview must print and exit without training or writing (not even the folder)"
    )
    assert "tokens are trained" in capsys.readouterr().out
    trainer = trainers[0]
    tokenizer = trainer.processing_class
    batch = next(iter(trainer.get_train_dataloader()))  # as the trainer's own collator builds it
    assert ("position_ids" in batch) == packing and batch["input_ids"].shape[0] == (1 if packing else 4)
    roles = set()
    for role, ids, labels in _label_spans(batch, tokenizer):
        roles.add(role)
        trained = [t for t, label in zip(ids, labels) if label != -100]
        if role in ("system", "user"):
            assert not trained, f"a {role} token carries a label"
        else:
            assert role == "assistant"
            assert all(label in (-100, t) for t, label in zip(ids, labels))
            text = tokenizer.decode(ids)
            answer = text[text.index("\n") + 1 : text.index("<|im_end|>") + len("<|im_end|>")]
            assert tokenizer.decode(trained) == answer  # the whole answer and its end-of-turn, nothing else
    assert roles == {"system", "user", "assistant"}


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_rows_do_not_attend_to_each_other(attention, trainers, tmp_path):
    argv = ["--packing", "true", "--attn_implementation", attention, "--output_dir", str(tmp_path), "--label_preview"]
    run_recipe("sft", [*TINY, *argv])
    trainer = trainers[0]
    batch = next(iter(trainer.get_train_dataloader()))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
    assert len(starts) > 3, "the packed row should hold several conversations"
    model = trainer.model.eval()
    assert model.config._attn_implementation == attention
    with torch.no_grad():
        packed = model(**inputs).logits[0]
        alone = torch.cat([model(input_ids=batch["input_ids"][:, a:b]).logits[0] for a, b in zip(starts, starts[1:])])
        leaky = model(input_ids=batch["input_ids"]).logits[0]  # one long sequence: what cross-attention looks like
    assert torch.allclose(packed, alone, atol=1e-4), "packed conversations see each other's tokens"
    assert not torch.allclose(leaky, alone, atol=1e-2)  # the check above can fail


def test_qlora_sft_loss_falls(tmp_path):
    run_recipe("sft", [*TINY, "--output_dir", str(tmp_path), "--max_steps", "8"])
    losses = train_losses(tmp_path)
    assert len(losses) == 8 and _falls(losses), losses
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 8


def test_a_runs_saved_config_repeats_the_run(tmp_path):
    """alignkit_config.yaml, grouped by section with every resolved value, is itself a recipe: the same losses."""
    first, again = tmp_path / "first", tmp_path / "again"
    run_recipe("sft", [*TINY, "--output_dir", str(first), "--max_steps", "2"])
    run_recipe("sft", ["--config", str(first / "alignkit_config.yaml"), "--output_dir", str(again)])
    assert train_losses(again) == train_losses(first)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_unmarked_template_trains_with_rendered_spans_not_replaced(packing, smollm2_like, trainers, tmp_path):
    """Issue 36: ChatML without {% generation %} marks is kept (never replaced); rendering separates its assistant
    turns (alignkit.data.chat_spans), and trl builds the labels from those masks: no user/system token trained,
    every assistant turn through <|im_end|>."""
    argv = ["--model_name_or_path", str(smollm2_like), "--load_in_4bit", "false", "--packing", str(packing)]
    run_recipe("sft", [*TINY, *argv, "--max_steps", "2", "--output_dir", str(tmp_path / "o")])
    trainer = trainers[0]
    tokenizer = trainer.processing_class
    assert tokenizer.alignkit_template.source == "rendered" and "{% generation %}" not in tokenizer.chat_template
    assert trainer.args.assistant_only_loss  # restored after trl built the labels from the rendered masks
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    batch = next(iter(trainer.get_train_dataloader()))
    roles = set()
    for role, ids, labels in _label_spans(batch, tokenizer):
        roles.add(role)
        trained = [t for t, label in zip(ids, labels) if label != -100]
        if role in ("system", "user"):
            assert not trained, f"a {role} token carries a label"
        elif end in ids:  # a whole assistant turn (not cut by max_length): content through <|im_end|>
            assert trained and trained[-1] == end
    assert "assistant" in roles


def test_lora_packed_sft_trains_and_saves_its_tokenizer(smollm2_like, trainers, tmp_path):
    argv = ["--model_name_or_path", str(smollm2_like), *"--load_in_4bit false --packing true --max_steps 8".split()]
    run_recipe("sft", [*TINY, *argv, "--chat_template", "chatml", "--output_dir", str(tmp_path)])
    losses = train_losses(tmp_path)
    assert len(losses) == 8 and _falls(losses), losses

    trained_with = trainers[0].processing_class
    # a pad distinct from eos (the contract), the template the recipe named
    assert trained_with.pad_token != trained_with.eos_token and trained_with.chat_template == CHATML
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text() == CHATML
    assert reloaded.chat_template == trained_with.chat_template
    for attr in ("eos_token", "eos_token_id", "pad_token", "pad_token_id", "bos_token"):
        assert getattr(reloaded, attr) == getattr(trained_with, attr), attr
    for generation_prompt in (False, True):
        messages = CHAT[:2] if generation_prompt else CHAT
        assert reloaded.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False) == (
            trained_with.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
        )
        assert reloaded(CHAT[1]["content"])["input_ids"] == trained_with(CHAT[1]["content"])["input_ids"]
    # The next stage loads the tokenizer from this output through the same contract: nothing left to change.
    handoff = parse_recipe(SFTConfig, [*TINY, "--model_name_or_path", str(tmp_path)])
    again = load_tokenizer(handoff.model, chat=True, assistant_only_loss=True, train_on_completions=True)
    assert again.alignkit_changes == [] and again.chat_template == CHATML and again.pad_token == trained_with.pad_token


def test_prompt_completion_data_trains_on_completions_only(trainers, tmp_path):
    rows = [{"prompt": f"What is {a} + 7?", "completion": f" ANSWER: {a + 7}"} for a in range(12)]
    data = write_jsonl(tmp_path / "pc.jsonl", rows)
    argv = ["--datasets", f"[{data}]", "--assistant_only_loss", "false", "--output_dir", str(tmp_path / "o")]
    run_recipe("sft", [*TINY, *argv, "--label_preview"])
    trainer = trainers[0]
    tokenizer = trainer.processing_class
    batch = next(iter(trainer.get_train_dataloader()))
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        trained = tokenizer.decode([t for t, label in zip(ids, labels) if label != -100])
        prompt = tokenizer.decode([t for t, label in zip(ids, labels) if label == -100 and t != tokenizer.pad_token_id])
        assert trained.startswith(" ANSWER: ") and trained.endswith(tokenizer.eos_token)  # learns to stop
        assert prompt.startswith("What is") and "ANSWER" not in prompt


def test_accelerate_launch_sft_saves_every_output(tmp_path):
    out = tmp_path / "sft"
    resolved = accelerate_launch_one_process("sft", TINY, out, steps=2)  # every group, CLI overrides applied
    assert (out / "chat_template.jinja").read_text() == CHATML
    assert json.loads((out / "tokenizer_config.json").read_text())["pad_token"] == "<pad>"
    assert resolved["SFTConfig"]["max_steps"] == 2 and resolved["SFTConfig"]["assistant_only_loss"]
    assert resolved["QuantizationArguments"]["load_in_4bit"]
    assert resolved["ModelArguments"]["model_name_or_path"] == "tiny:llama"
