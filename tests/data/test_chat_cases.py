"""Issue 36's five numbered cases, each through an entry point a user runs (a recipe, or `alignkit data preview`):
now right, or refused before step 1 naming the file/row and the fix; none exits 0 with the field ignored. The
per-family table (every family's stock template, spans, stop token, tools, reasoning, saved == stock) is
tests/data/test_chat_families.py; tool rows through DPO/KTO/ORPO/SimPO/reward/GRPO: tests/stages/test_chat_stages.py."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from conftest import run_recipe, write_jsonl

from alignkit.data.chat_families import stock_template
from alignkit.errors import PreflightError

CALC = [{"type": "function", "function": {"name": "calculator", "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}}}}]  # fmt: skip
THOUGHT = "Use the tool zebra."
RESULT = "6868"  # the tool's result: rendered, never trained


def _tool_row(reasoning: bool = True) -> dict:
    call = {"type": "function", "function": {"name": "calculator", "arguments": '{"expression": "23 + 45"}'}}
    turn = {"role": "assistant", "content": "", "tool_calls": [call]}
    if reasoning:
        turn["reasoning_content"] = THOUGHT
    messages = [
        {"role": "user", "content": "What is 23 + 45?"},
        turn,
        {"role": "tool", "name": "calculator", "content": RESULT},
        {"role": "assistant", "content": "It is 68."},
    ]
    return {"messages": messages, "tools": CALC}


# tiny:llama has 512 positions; a row with Qwen's tools preamble is ~600 tiny-BPE tokens (its weights are random)
LONG = ["--max_length", "1024", "--config_overrides", '{"max_position_embeddings": 1024}']


def _preview(capsys, tmp_path, data, *extra) -> tuple[int, str, str]:
    from alignkit.cli import main as cli

    argv = ["data", "preview", "sft", "--config", "recipes/tiny/sft.yaml", "--datasets", str(data), "--test_size",
            "0", "--load_in_4bit", "false", *LONG, "--output_dir", str(tmp_path / "out"), *extra]  # fmt: skip
    code = cli(argv)
    out, err = capsys.readouterr()
    assert not (tmp_path / "out").exists()  # a preview trains and writes nothing
    return code, out, err


def _trained(preview: str) -> tuple[str, str]:
    """(the text, the trained text) of a label preview: all tokens with the brackets taken off, and the [bracketed]
    tokens joined (the rows here hold no brackets)."""
    body = preview.split("trained tokens are shown [in brackets]\n", 1)[1]
    return re.sub(r"\[([^\[\]]*)\]", r"\1", body), "".join(re.findall(r"\[([^\[\]]*)\]", body))


# ------------------------------------------------------------------------------------------- case 1: a base Gemma
def test_case1_base_gemma_with_the_shipped_chatml_recipe_is_refused_naming_its_own_family(tmp_path):
    """The shipped QLoRA recipe asks for ChatML; a base Gemma vocabulary has no <|im_end|>, and 4-bit embeddings
    cannot grow: refused before training, and the fix names Gemma's own format (its <end_of_turn> is in the
    vocabulary), not only chatml_eos. chat_template: gemma3 training itself: tests/models/test_gemma3.py."""
    out = tmp_path / "out"
    argv = ["--config", "recipes/smollm2/sft_qlora.yaml", "--model_name_or_path", "tiny:gemma3", "--max_steps", "1",
            "--output_dir", str(out)]  # fmt: skip
    with pytest.raises(PreflightError, match=r"4-bit model's embeddings.*<end_of_turn>.*chat_template: gemma, gemma3"):
        run_recipe("sft", argv)
    assert not out.exists()


def test_case1_base_gemma_without_a_template_is_told_its_family(caplog):
    """No chat_template in the recipe: the base gets alignkit's chatml_eos (no new tokens) and the warning names
    chat_template: gemma3, the family whose end-of-turn its vocabulary has."""
    from alignkit.models import apply_contract
    from alignkit.testing.families import family_tokenizer

    changes = apply_contract(family_tokenizer("gemma3", with_template=False), chat=True, assistant_only_loss=True)
    assert any("'chatml_eos'" in c and "<end_of_turn>" in c and "chat_template: gemma, gemma3" in c for c in changes)


# ---------------------------------------------------------------------- case 2: stock Qwen2.5 / Qwen3 templates
@pytest.mark.parametrize("family", ["qwen2_5", "qwen3"])
def test_case2_stock_qwen_templates_train_with_assistant_only_loss(family, tiny_llama, tmp_path):
    """A model folder whose tokenizer carries the stock Qwen2.5 / Qwen3 template (assistant_only_loss: true, as the
    recipes set): accepted, trained with the family's proven twin (not ChatML), saved with the stock text."""
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    (model / "chat_template.jinja").write_text(stock_template(family), encoding="utf-8")
    out = tmp_path / "out"
    argv = ["--config", "recipes/tiny/sft.yaml", "--model_name_or_path", str(model), "--load_in_4bit", "false",
            "--test_size", "0", "--max_steps", "1", "--save_steps", "100", "--disable_tqdm", "true",
            "--output_dir", str(out)]  # fmt: skip
    run_recipe("sft", argv)
    assert (out / "chat_template.jinja").read_text(encoding="utf-8") == stock_template(family)
    entry = json.loads((out / "alignkit_run.json").read_text())["lineage"][-1]
    assert entry["chat_template"] == {"family": family, "source": "twin"}


# ----------------------------------------- cases 3 and 4: a tools column, assistant tool_calls, tool messages
@pytest.mark.parametrize("train_on_reasoning", [True, False])
def test_cases_3_4_5_tools_calls_and_reasoning_in_the_data_preview(train_on_reasoning, tmp_path, capsys):
    """`alignkit data preview` on tool rows with reasoning (Qwen3's template): the family and template source are
    shown; the tools are rendered; the call (empty content) and final reply are trained; the tool's result never;
    the thinking trained or not as train_on_reasoning says; exit 0 (issue 36, item 4 of the build)."""
    data = write_jsonl(tmp_path / "tools.jsonl", [_tool_row()] * 2)
    code, out, err = _preview(
        capsys, tmp_path, data, "--chat_template", "qwen3", "--train_on_reasoning", str(train_on_reasoning).lower()
    )
    assert code == 0, err
    assert "chat format: family qwen3, template installed, twin" in out
    preview, trained = _trained(out[out.index("label preview:") :])
    assert "# Tools" in preview and "<tools>" not in trained  # case 3: the tools are rendered (the schema text in
    # the middle of the preamble is elided from the preview; tests/stages/test_chat_stages.py reads it in the batch)
    assert '<tool_call>\n{"name": "calculator", "arguments": {"expression": "23 + 45"}}\n</tool_call>' in trained
    assert "It is 68.<|im_end|>" in trained and RESULT in preview and RESULT not in trained  # case 4
    assert THOUGHT in preview and (THOUGHT in trained) == train_on_reasoning  # case 5


@pytest.mark.parametrize(
    "family,row,match",
    [
        (
            "gemma3",
            _tool_row(reasoning=False),
            r"tools.jsonl( \[train\])?, row 1.*uses tools.*qwen2_5",
        ),  # case 3: not rendered
        (
            "llama3_1",
            {
                "messages": [
                    {"role": "user", "content": "2+2?"},
                    {"role": "assistant", "content": "4", "reasoning_content": THOUGHT},
                ]
            },  # fmt: skip
            r"tools.jsonl( \[train\])?, row 1.*reasoning_content.*would be dropped.*qwen3",
        ),  # case 5: would be dropped
        (
            "qwen2_5",
            {**_tool_row(reasoning=False), "tools": []},
            r"tools.jsonl( \[train\])?, row 1.*calls 'calculator', which the row's tools do not declare",
        ),  # fmt: skip
    ],
)
def test_cases_3_4_5_fields_a_template_cannot_render_are_refused_with_row_and_fix(family, row, match, tmp_path, capsys):
    """A field the run's template would drop, or a call to an undeclared tool: exit 2 before training, the file,
    the row and the fix on stderr, no traceback."""
    data = write_jsonl(tmp_path / "tools.jsonl", [row])
    code, out, err = _preview(capsys, tmp_path, data, "--chat_template", family)
    said = (out + err).replace("\n", " ")  # the data preview shows a refused source's row and the error
    assert code == 2 and re.search(match, said), said
    assert "Traceback" not in said


@pytest.mark.parametrize("family", ["qwen3", "chatml"])
def test_case5_inline_think_is_masked_by_a_reasoning_template_or_refused(family, tmp_path, capsys):
    """An inline <think>...</think> in the reply with train_on_reasoning: false: Qwen3's template renders it as its
    think block and the thinking is untrained; a template without reasoning (ChatML) would train it as reply text,
    so the row is refused with the fix."""
    reply = f"<think>\n{THOUGHT}\n</think>\n\nIt is 4."
    row = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": reply}]}
    data = write_jsonl(tmp_path / "think.jsonl", [row] * 2)
    code, out, err = _preview(capsys, tmp_path, data, "--chat_template", family, "--train_on_reasoning", "false")
    if family == "chatml":
        said = out + err  # the data preview shows a refused source and the error
        assert code == 2 and re.search(r"think.jsonl( \[train\])?, row 1", said) and "inline <think>" in said
        assert "train_on_reasoning: true" in said
        return
    assert code == 0, err
    text, trained = _trained(out[out.index("label preview:") :])
    assert THOUGHT in text and THOUGHT not in trained and "It is 4.<|im_end|>" in trained


def test_case4_a_template_that_renders_the_tools_but_drops_the_calls_is_refused():
    """A template (hand-written here, in the shape of templates that list the tools in the system turn and render
    tool results as user turns but print only an assistant's content) would train a tool row with its call dropped:
    rendering finds the call missing, so the row is refused, naming the families that render calls."""
    from datasets import Dataset

    from alignkit.data.chat_rows import check_rows
    from alignkit.data.schemas import SFT
    from alignkit.errors import DataError
    from alignkit.models import apply_contract
    from alignkit.testing.families import family_tokenizer

    tok = family_tokenizer("qwen2_5", with_template=False)
    tok.chat_template = (
        "{{- '<|im_start|>system\\n' }}{%- if tools %}{%- for t in tools %}{{- t | tojson }}{%- endfor %}{%- endif %}"
        "{{- '<|im_end|>\\n' }}{%- for m in messages %}{%- if m.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
        "{% generation %}{{- (m.content or '') + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}{%- else %}"
        "{{- '<|im_start|>' + ('user' if m.role == 'tool' else m.role) + '\\n' + m.content + '<|im_end|>\\n' }}"
        "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )
    apply_contract(tok, chat=True, assistant_only_loss=True)
    assert not tok.alignkit_template.features.tools
    data = SFT.check(Dataset.from_list([_tool_row(reasoning=False)]), "tools.jsonl")
    with pytest.raises(
        DataError, match=r"tools.jsonl, row 1: uses tools, which this chat template does not render.*qwen2_5"
    ):
        check_rows(tok, data, "tools.jsonl")
