"""Issue 36: a custom template without {% generation %} marks trains with assistant-only loss when rendering separates
its assistant turns (prefix with add_generation_prompt vs prefix plus the turn), each a contiguous token span ending
on a stop token; a template whose turns cannot be separated is refused with the fix."""

import pytest
from conftest import run_recipe

from alignkit.data.chat_probes import PROBES
from alignkit.data.chat_spans import SOURCE, rendered_mask, tokenize_with_rendered_spans
from alignkit.data.templates import CHATML, assistant_spans
from alignkit.errors import ConfigError, DataError
from alignkit.models import apply_contract
from alignkit.testing.families import family_tokenizer

# ChatML written by hand, without generation marks (so no family alignkit knows, and trl has no twin for it).
PLAIN_CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Counts the messages in a header: a prefix of the conversation does not render as a prefix of its text.
COUNTED = "{{ 'Conversation of ' + messages|length|string + ' messages\\n' }}" + PLAIN_CHATML
# Turns end on plain text, no special token: the model could not learn to stop.
NO_STOP = (
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


def _marked_mask(tok, messages, **kwargs):
    out = tok.apply_chat_template(
        messages, chat_template=CHATML, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, **kwargs
    )
    return list(out["input_ids"]), list(out["assistant_masks"])


def test_unmarked_template_gets_its_spans_by_rendering_equal_to_the_marked_twin():
    tok = family_tokenizer("qwen2_5")
    tok.chat_template = PLAIN_CHATML
    apply_contract(tok, chat=True, assistant_only_loss=True)  # accepted, not replaced
    info = tok.alignkit_template
    assert (info.family, info.source, info.stock) == (None, SOURCE, PLAIN_CHATML)
    assert tok.chat_template == PLAIN_CHATML
    for name in ("system", "multi_turn"):
        messages, _ = PROBES[name]
        ids, mask = rendered_mask(tok, messages)
        # PLAIN_CHATML renders what alignkit's marked CHATML renders (plus a newline after each reply): the spans
        # found by rendering are exactly the marked ones, content through <|im_end|>, the newline untrained.
        marked_ids, marked_mask = _marked_mask(tok, messages)
        assert ids == marked_ids and mask == marked_mask
        spans = assistant_spans(mask)
        assert len(spans) == 2 and all(tok.convert_ids_to_tokens(ids[b - 1]) == "<|im_end|>" for a, b in spans)
        assert [tok.decode(ids[a:b]) for a, b in spans] == ["It is 4.<|im_end|>", "It is 6.<|im_end|>"]


@pytest.mark.parametrize(
    "template,match",
    [(COUNTED, "not a prefix"), (NO_STOP, "not on a special token")],
)
def test_template_whose_turns_cannot_be_separated_is_refused(template, match):
    tok = family_tokenizer("qwen2_5")
    tok.chat_template = template
    with pytest.raises(ConfigError, match=f"cannot be separated by rendering.*{match}.*Fix: use the model family"):
        apply_contract(tok, chat=True, assistant_only_loss=True)
    if template is COUNTED:  # without assistant-only loss its turns still end on <|im_end|>: accepted
        apply_contract(tok, chat=True, assistant_only_loss=False)


def test_rows_become_trl_pretokenized_rows_and_a_bad_row_is_a_data_error():
    from datasets import Dataset

    tok = family_tokenizer("qwen2_5")
    tok.chat_template = PLAIN_CHATML
    apply_contract(tok, chat=True, assistant_only_loss=True)
    rows = [{"messages": PROBES["multi_turn"][0]}, {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello."}]}]  # fmt: skip
    data = tokenize_with_rendered_spans(Dataset.from_list(rows[:1]), tok, "chat.jsonl")
    assert data.column_names == ["input_ids", "assistant_masks"]
    assert (data[0]["input_ids"], data[0]["assistant_masks"]) == _marked_mask(tok, rows[0]["messages"])
    pc = tokenize_with_rendered_spans(Dataset.from_list(rows[1:]), tok, "pc.jsonl")[0]
    assert tok.decode([t for t, m in zip(pc["input_ids"], pc["assistant_masks"]) if m]) == "Hello.<|im_end|>"
    tok.chat_template = COUNTED
    with pytest.raises(DataError, match=r"chat.jsonl.*row 1.*cannot be separated"):
        tokenize_with_rendered_spans(Dataset.from_list(rows[:1]), tok, "chat.jsonl")


def test_sft_trains_an_unmarked_template_with_rendered_spans(tmp_path, capsys):
    """A tiny SFT run with a hand-written template without marks: the label preview shows the rendered spans
    trained (content through <|im_end|>, prompts untrained), the run trains and saves the template unchanged."""
    template = tmp_path / "plain_chatml.jinja"
    template.write_text(PLAIN_CHATML, encoding="utf-8")
    out = tmp_path / "out"
    argv = ["--config", "recipes/tiny/sft.yaml", "--chat_template", str(template), "--load_in_4bit", "false",
            "--test_size", "0", "--max_steps", "3", "--save_steps", "100", "--disable_tqdm", "true",
            "--output_dir", str(out / "preview"), "--label_preview", "true"]  # fmt: skip
    run_recipe("sft", argv)
    preview = capsys.readouterr().out
    assert "assistant spans found by rendering" in preview
    assert "[<|im_end|>]" in preview and "<|im_start|>user" in preview and "[<|im_start|>]" not in preview
    argv = [*argv[:-4], "--output_dir", str(out / "run")]
    metrics = run_recipe("sft", argv)
    assert metrics["train_loss"] > 0
    assert (out / "run" / "chat_template.jinja").read_text(encoding="utf-8") == PLAIN_CHATML
