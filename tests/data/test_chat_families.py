"""Every family trains in its own chat format (issue 36; issue 37 case 6): stock templates accepted with
assistant-only loss through a training twin proven by rendering, spans through the family's stop token, tools and
reasoning rendered as the stock template renders them, the saved template the stock one. Tokenizer-only (tiny
tokenizers with each family's special tokens and trl's stored stock template), except one short SFT run."""

import json

import pytest
from conftest import run_recipe

from alignkit.data.chat_families import FAMILIES, identify, save_tokenizer, stock_template, twin_template
from alignkit.data.chat_probes import PROBES, prove_twin
from alignkit.data.chat_rows import check_rows
from alignkit.data.schemas import SFT
from alignkit.data.templates import assistant_spans
from alignkit.errors import ConfigError, DataError
from alignkit.models import apply_contract
from alignkit.testing.families import family_tokenizer

# The must-show table: family -> (tools rendered, reasoning rendered) by its stock template, as rendering finds.
TABLE = {
    "llama3": (False, False),
    "llama3_1": (True, False),
    "llama3_2": (True, False),
    "qwen2_5": (True, False),
    "qwen3": (True, True),
    "gemma": (False, False),
    "gemma3": (False, False),
    "mistral": (False, False),
    "phi3": (False, False),
    "phi3_5": (False, False),
    "phi4": (False, False),
    "smollm2": (False, False),
    "deepseek_r1_distill": (False, False),
    "gptoss": (True, True),
}


def _datasets(rows):
    from datasets import Dataset

    return Dataset.from_list(rows)


@pytest.mark.parametrize("family", sorted(TABLE))
def test_stock_template_trains_with_a_twin_that_renders_the_same_text(family, tmp_path):
    tok = family_tokenizer(family)
    assert identify(tok.chat_template) == family
    apply_contract(tok, chat=True, assistant_only_loss=True)  # accepted: no ConfigError, no ChatML
    info = tok.alignkit_template
    assert (info.family, info.source, info.stock) == (family, "twin", stock_template(family))
    eot = tok.convert_tokens_to_ids(FAMILIES[family].end_of_turn)
    assert eot in tok.alignkit_stop_ids  # the family's end-of-turn is a stop token
    features = info.features
    assert (features.tools, features.reasoning) == TABLE[family]
    for name, text in features.accepted.items():  # every probe the stock template accepts
        messages, kwargs = PROBES[name]
        assert tok.apply_chat_template(messages, tokenize=False, **kwargs) == text  # twin == stock, exactly
        if name in ("tools", "builtin_tools") and not features.tools:
            continue  # the template drops tool turns (Phi-4): tool rows are refused, only the text is compared
        out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, **kwargs)  # fmt: skip
        ids, spans = out["input_ids"], assistant_spans(out["assistant_masks"])
        assert len(spans) == sum(m["role"] == "assistant" for m in messages)
        for a, b in spans:  # each span ends on a stop token (the family's, or a call's <|call|>), whitespace after
            last = [t for t in ids[a:b] if tok.decode([t]).strip()][-1]
            assert last in set(tok.all_special_ids), (family, name, tok.decode(ids[a:b]))
        if name in ("system", "multi_turn"):
            assert any(ids[b - 1] == eot or eot in ids[a:b] for a, b in spans)
    save_tokenizer(tok, tmp_path)  # saved: the stock template, never the twin
    saved = (tmp_path / "chat_template.jinja").read_text(encoding="utf-8")
    assert saved == stock_template(family)


def test_trl_qwen3_twin_is_not_faithful_so_alignkit_uses_its_own():
    """trl's qwen3_training.jinja renders a think block in every assistant turn; the stock template only after the
    last user turn. The proof catches it; alignkit's patched twin passes."""
    tok = family_tokenizer("qwen3")
    trl_twin = (FAMILIES["qwen3"].stock_path().parent / "qwen3_training.jinja").read_text(encoding="utf-8")
    with pytest.raises(ConfigError, match="renders the 'system' probe differently"):
        prove_twin(tok, stock_template("qwen3"), trl_twin, "qwen3")
    prove_twin(tok, stock_template("qwen3"), twin_template("qwen3"), "qwen3")


@pytest.mark.parametrize("family", ["gemma3", "llama3_1", "qwen2_5", "qwen3", "chatml", "chatml_eos"])
def test_chat_template_family_on_a_base_tokenizer(family, tmp_path):
    from alignkit.testing.tiny import _base_llama_tokenizer

    tok = _base_llama_tokenizer()
    changes = apply_contract(tok, chat_template=family, chat=True, assistant_only_loss=True)
    assert tok.alignkit_template.family == family and tok.alignkit_template.source.startswith("installed")
    eot = tok.eos_token if family == "chatml_eos" else FAMILIES.get(family, FAMILIES["qwen2_5"]).end_of_turn
    eot_id = tok.convert_tokens_to_ids(eot)
    assert eot_id in tok.alignkit_stop_ids
    if family != "chatml_eos":  # added as one special token (first of the family's markers), its rows trained
        assert tok.alignkit_new_token_ids[0] == eot_id and any("not in the vocabulary" in c for c in changes)
    save_tokenizer(tok, tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text(encoding="utf-8") == stock_template(family)


def test_gemma_end_of_turn_in_the_vocabulary_is_used_not_added():
    tok = family_tokenizer("gemma3", with_template=False)
    size = len(tok)
    apply_contract(tok, chat_template="gemma3", chat=True, assistant_only_loss=True)
    assert len(tok) == size and tok.alignkit_new_token_ids == []
    assert tok.convert_tokens_to_ids("<end_of_turn>") in tok.alignkit_stop_ids


def _tool_row(**overrides):
    row = {
        "messages": [
            {"role": "user", "content": "What is 2 + 3?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}],
            },  # fmt: skip
            {"role": "tool", "name": "add", "content": "5"},
            {"role": "assistant", "content": "It is 5."},
        ],
        "tools": [
            {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}
        ],
    }
    return {**row, **overrides}


def test_tool_rows_are_accepted_rendered_and_only_calls_trained():
    tok = family_tokenizer("qwen2_5")
    apply_contract(tok, chat=True, assistant_only_loss=True)
    data = SFT.check(_datasets([_tool_row()]), "tools.jsonl")
    assert "tools" in data.column_names
    check_rows(tok, data, "tools.jsonl")
    row = data[0]
    assert isinstance(row["tools"], str)  # stored as JSON text (alignkit.data.tools.normalize_tool_rows)
    out = tok.apply_chat_template(row["messages"], tools=json.loads(row["tools"]), tokenize=True, return_dict=True, return_assistant_tokens_mask=True)  # fmt: skip
    text = tok.decode(out["input_ids"])
    trained = tok.decode([t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m])
    assert '"name": "add"' in trained and "<tool_call>" in trained  # the call is trained
    assert "<tool_response>\n5" in text and "<tool_response>" not in trained  # the result never
    assert '"add"' in text.split("<|im_end|>")[0]  # the tool schema is rendered in the system turn


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"tools": []}, "calls 'add', which the row's tools do not declare"),
        ({"tools": "not json"}, "'tools' is not valid JSON"),
    ],
)
def test_bad_tool_rows_are_refused_with_the_row(bad, match):
    with pytest.raises(DataError, match=match):
        SFT.check(_datasets([_tool_row(**bad)]), "tools.jsonl")


def test_bad_arguments_and_orphan_tool_results_are_refused():
    row = _tool_row()
    row["messages"][1]["tool_calls"][0]["function"]["arguments"] = "{a: 2"
    with pytest.raises(DataError, match="arguments is not valid JSON"):
        SFT.check(_datasets([row]), "tools.jsonl")
    row = _tool_row()
    row["messages"] = [row["messages"][0], {"role": "tool", "content": "5"}, row["messages"][3]]
    with pytest.raises(DataError, match="follows no tool call"):
        SFT.check(_datasets([row]), "tools.jsonl")


def test_a_template_that_cannot_render_tools_is_refused_naming_families_that_can():
    tok = family_tokenizer("gemma3")
    apply_contract(tok, chat=True, assistant_only_loss=True)
    data = SFT.check(_datasets([_tool_row()]), "tools.jsonl")
    with pytest.raises(DataError, match=r"row 1.*does not render.*qwen2_5"):
        check_rows(tok, data, "tools.jsonl")


@pytest.mark.parametrize("train_on_reasoning", [True, False])
def test_reasoning_trained_or_masked_and_no_think_rows_render_as_stock(train_on_reasoning):
    tok = family_tokenizer("qwen3")
    apply_contract(tok, chat=True, assistant_only_loss=True, train_on_reasoning=train_on_reasoning)
    thought = "Two plus two makes four because counting."
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": thought},
    ]
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    think = tok(thought, add_special_tokens=False)["input_ids"]
    trained = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    rendered = tok.decode(out["input_ids"])
    assert thought in rendered
    assert tok.decode(trained).count(thought) == (1 if train_on_reasoning else 0)
    if not train_on_reasoning:
        assert not set(think) & set(trained) - set(tok(" 4<|im_end|>\n")["input_ids"])
    plain = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    stock = tok.apply_chat_template(plain, chat_template=stock_template("qwen3"), tokenize=False)
    assert tok.apply_chat_template(plain, tokenize=False) == stock and "<think>\n\n</think>" in stock


def test_reasoning_content_on_a_template_without_reasoning_is_refused():
    tok = family_tokenizer("llama3_1")
    apply_contract(tok, chat=True, assistant_only_loss=True)
    row = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning_content": "count"}]}  # fmt: skip
    with pytest.raises(DataError, match=r"row 1.*reasoning_content.*qwen3"):
        check_rows(tok, _datasets([row]), "r.jsonl")
    with pytest.raises(ConfigError, match="train_on_reasoning: false needs a twin"):
        apply_contract(family_tokenizer("deepseek_r1_distill"), chat=True, assistant_only_loss=True, train_on_reasoning=False)  # fmt: skip


@pytest.mark.parametrize("train_on_reasoning", [True, False])
def test_gptoss_analysis_channel_trained_or_masked(train_on_reasoning):
    """gpt-oss: with train_on_reasoning false alignkit's twin leaves the analysis channel out of the marks (trl's
    twin marks it with the reply); the rendered text is the stock template's either way (prove_twin)."""
    tok = family_tokenizer("gptoss")
    apply_contract(tok, chat=True, assistant_only_loss=True, train_on_reasoning=train_on_reasoning)
    thought = "Two plus two makes four because counting."
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": thought},
    ]
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    text = tok.decode(out["input_ids"])
    assert text == tok.apply_chat_template(messages, chat_template=stock_template("gptoss"), tokenize=False)
    trained = [tok.decode(out["input_ids"][a:b]) for a, b in assistant_spans(out["assistant_masks"])]
    assert f"<|channel|>analysis<|message|>{thought}<|end|>" in text
    final = "<|start|>assistant<|channel|>final<|message|>4<|return|>"
    if train_on_reasoning:
        assert len(trained) == 1 and thought in trained[0] and trained[0].endswith(final)
    else:
        assert trained == [final]  # zero analysis tokens trained, the final channel through <|return|>


@pytest.mark.parametrize("family", ["gemma", "mistral"])
def test_system_rejecting_template_trains_system_free_data_and_refuses_a_system_row(family):
    """Issue 37 case 6: the probes use only the roles the template accepts; a system row is a DataError with its
    row number and the template's own message; a template refusing everything is a ConfigError quoting it."""
    tok = family_tokenizer(family)
    apply_contract(tok, chat=True, assistant_only_loss=True)  # no traceback: the probe drops the system turn
    ok = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    system = {"messages": [{"role": "system", "content": "Be brief."}, *ok["messages"]]}
    check_rows(tok, _datasets([ok, ok]), "chat.jsonl")
    with pytest.raises(DataError, match=r"row 3.*refuses this conversation.*(System role not supported|alternate)"):
        check_rows(tok, _datasets([ok, ok, system]), "chat.jsonl")
    tok.chat_template = "{{ raise_exception('This template renders nothing.') }}"
    with pytest.raises(ConfigError, match="This template renders nothing"):
        apply_contract(tok, chat=True)


def test_sft_with_chat_template_gemma3_on_a_base_model(tmp_path):
    """One short tiny-model run: a base tokenizer without Gemma's tokens gets Gemma 3's template, <end_of_turn> is
    added and trained (peft trainable_token_indices), saved template == stock, generation config stops on it, the
    run record and card name the family."""
    out = tmp_path / "out"
    argv = ["--config", "recipes/tiny/sft.yaml", "--model_name_or_path", "tiny:llama_base", "--chat_template",
            "gemma3", "--load_in_4bit", "false", "--test_size", "0", "--max_steps", "4", "--save_steps", "100",
            "--disable_tqdm", "true", "--output_dir", str(out)]  # fmt: skip
    run_recipe("sft", argv)
    assert (out / "chat_template.jinja").read_text(encoding="utf-8") == stock_template("gemma3")
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    from transformers import AutoTokenizer

    eot = AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<end_of_turn>")
    assert eot in json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    sot = AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<start_of_turn>")  # every marker, one token each
    assert json.loads((out / "adapter_config.json").read_text())["trainable_token_indices"] == [eot, sot]
    entry = json.loads((out / "alignkit_run.json").read_text())["lineage"][-1]
    assert entry["chat_template"] == {"family": "gemma3", "source": "installed, twin"}
    assert "gemma3" in (out / "README.md").read_text()
    assert tokenizer_config
    # alignkit chat / generate / eval load the run the same way: the saved stock template renders the prompt, and
    # generation stops on <end_of_turn> (forced here after two tokens: the reply ends there, before max_new_tokens)
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    from alignkit.data.templates import end_of_turn_ids
    from alignkit.export.generate import generate_replies, load_for_generation

    model, tok = load_for_generation(out)
    assert tok.chat_template == stock_template("gemma3") and eot in end_of_turn_ids(tok)
    chat = [{"role": "user", "content": "What is 2 + 2?"}]
    assert tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False).endswith("<start_of_turn>model\n")

    class EndAfterTwo(LogitsProcessor):
        def __init__(self, start):
            self.start, self.lengths = start, []

        def __call__(self, input_ids, scores):
            self.lengths.append(input_ids.shape[1] - self.start)
            if self.lengths[-1] >= 2:
                scores = torch.full_like(scores, -float("inf"))
                scores[:, eot] = 0.0
            return scores

    start = len(tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    force = EndAfterTwo(start)
    replies = generate_replies(model, tok, [chat], max_new_tokens=16, logits_processor=LogitsProcessorList([force]))
    assert len(replies) == 1 and max(force.lengths) == 2  # stopped on <end_of_turn>, 13 tokens before the limit


@pytest.mark.parametrize("family", ["qwen2_5", "qwen3", "llama3_1", "gptoss"])
def test_arguments_as_a_json_string_render_as_the_object_form(family):
    """Issue 36: OpenAI's arguments string is parsed before rendering, so templates applying `| tojson` (Qwen2.5,
    Llama 3.1) print the object, not a second-escaped string: the rendered text equals the object form's."""
    tok = family_tokenizer(family)
    apply_contract(tok, chat=True, assistant_only_loss=True)
    tools = [{"type": "function", "function": {"name": "add", "description": "Add.", "parameters": {"type": "object", "properties": {}}}}]  # fmt: skip
    as_object = _tool_row(tools=tools)
    as_object["messages"][1]["tool_calls"][0]["function"]["arguments"] = {"a": 2, "b": 3}
    expected = tok.apply_chat_template(as_object["messages"], tools=tools, tokenize=False)
    data = SFT.check(_datasets([_tool_row(tools=tools)]), "tools.jsonl")
    row = data[0]
    text = tok.apply_chat_template(row["messages"], tools=json.loads(row["tools"]), tokenize=False)
    assert text == expected and '\\"a\\"' not in text


def test_a_sources_tools_apply_to_every_row_without_its_own(tmp_path):
    """Issue 36: `tools` on a dataset source (data config) is given to every row without its own; a row's own
    tools win; calls are checked against them; bad source tools are refused naming the source."""
    from alignkit.config.args import DataArguments
    from alignkit.data.sources import load_datasets

    shared = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}]
    own = [{"type": "function", "function": {"name": "mul", "parameters": {"type": "object", "properties": {}}}}]
    rows = [_tool_row(), _tool_row(), _tool_row(tools=own)]
    rows[1]["tools"] = None
    del rows[0]["tools"]
    rows[2]["messages"][1]["tool_calls"][0]["function"]["name"] = "mul"
    path = tmp_path / "tools.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = load_datasets(DataArguments(datasets=[{"path": str(path), "tools": shared}], test_size=0), SFT)["train"]
    assert [json.loads(t) for t in data["tools"]] == [shared, shared, own]
    tok = family_tokenizer("qwen2_5")
    apply_contract(tok, chat=True, assistant_only_loss=True)
    check_rows(tok, data, "tools.jsonl")
    text = tok.apply_chat_template(data[0]["messages"], tools=json.loads(data[0]["tools"]), tokenize=False)
    assert '"name": "add"' in text.split("<|im_end|>")[0]  # the source's tools rendered in the system turn
    with pytest.raises(DataError, match=r"tools.jsonl, row 1.*calls 'add', which the row's tools do not declare"):
        load_datasets(DataArguments(datasets=[{"path": str(path), "tools": own}], test_size=0), SFT)
    with pytest.raises(DataError, match=r"source's tools.*tools\[0\] has no function name"):
        load_datasets(DataArguments(datasets=[{"path": str(path), "tools": [{"x": 1}]}], test_size=0), SFT)


def test_alignkit_stock_templates_are_the_public_verbatim_copies():
    """mistral.jinja and phi4.jinja byte-for-byte as llama.cpp records Mistral-7B-Instruct-v0.2's and phi-4's
    templates (ggml-org/llama.cpp tests/test-chat-template.cpp, commit 03f94f19a2c4c9d039fa1a84838fe3e2110cc28d).
    (smollm2.jinja == the installed SmolLM2-135M-Instruct tokenizer's: tests/export/test_gguf.py.)"""
    import hashlib

    digests = {name: hashlib.sha256(stock_template(name).encode("utf-8")).hexdigest() for name in ("mistral", "phi4")}
    assert digests == {
        "mistral": "26a59556925c987317ce5291811ba3b7f32ec4c647c400c6cc7e3a9993007ba7",
        "phi4": "a41fb8727c4f1e722e53cb1ea935038a1177b8bdf09387f3b048f9da5255ef3e",
    }


def _chat(tools: bool, reasoning: bool) -> dict:
    """Two assistant turns (so an earlier turn's end marker is rendered too), with a tool call and its result where
    the family renders tools and a reasoning block where it renders reasoning."""
    row = _tool_row() if tools else {"messages": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "It is 5."}]}  # fmt: skip
    messages = [*row["messages"], {"role": "user", "content": "And 2 + 4?"}, {"role": "assistant", "content": "6."}]
    if reasoning:
        messages[-1] = {**messages[-1], "reasoning_content": "Two plus four makes six."}
    described = [{"type": "function", "function": {"name": "add", "description": "Add.", "parameters": {"type": "object", "properties": {}}}}]  # fmt: skip
    return {"messages": messages, **({"tools": described} if tools else {})}


@pytest.mark.parametrize("family", ["chatml", *sorted(TABLE)])
def test_every_family_installed_on_a_base_vocabulary_adds_every_marker_as_one_token(family):
    """Defect 16e-1: chat_template: gptoss on tiny:llama added only <|return|>, so <|end|> (which closes earlier
    turns) was split into pieces and the twin's first span ended on 'd|>'. Every marker the family's template writes
    (stop tokens and turn delimiters, derived from the template text) is now one special token: the rendered chat
    has each marker as its own id, as many times as the text has it, and every trained span ends on a stop token,
    the last on the family's own end-of-turn token."""
    from alignkit.data.chat_families import marker_tokens
    from alignkit.data.templates import span_stop, special_ids, turn_spans
    from alignkit.testing.tiny import _base_llama_tokenizer

    tok = _base_llama_tokenizer()
    size = len(tok)
    apply_contract(tok, chat_template=family, chat=True, assistant_only_loss=True)
    markers = marker_tokens(family, tok)
    new = [m for m in markers if m not in (tok.eos_token, tok.bos_token)]
    assert tok.convert_ids_to_tokens(tok.alignkit_new_token_ids) == new and len(tok) == size + len(new)
    tools, reasoning = TABLE.get(family, (False, False))
    chat = _chat(tools, reasoning)
    out = tok.apply_chat_template(chat["messages"], tools=chat.get("tools"), tokenize=True, return_dict=True, return_assistant_tokens_mask=True)  # fmt: skip
    ids = out["input_ids"]
    text = tok.apply_chat_template(chat["messages"], tools=chat.get("tools"), tokenize=False)
    for marker in markers:
        assert text.count(marker) == ids.count(tok.convert_tokens_to_ids(marker)), marker  # never split in pieces
    spans = turn_spans(ids, out["assistant_masks"], tok)
    assert len(spans) == sum(m["role"] == "assistant" for m in chat["messages"])
    # every span ends on a marker token; the last (the reply generation writes) on a stop token: earlier turns are
    # history, which gpt-oss closes with <|end|>, not a stop (defect rev17d-1)
    special = special_ids(tok)
    assert all(span_stop(ids[a:b], special, tok) is not None for a, b in spans), [
        tok.decode(ids[a:b]) for a, b in spans
    ]
    assert span_stop(ids[spans[-1][0] : spans[-1][1]], set(tok.alignkit_stop_ids), tok) is not None
    eot = FAMILIES[family].end_of_turn if family in FAMILIES else "<|im_end|>"
    last = ids[spans[-1][0] : spans[-1][1]]
    assert tok.convert_tokens_to_ids(eot) in last and "6." in tok.decode(last)
    if tools:
        assert any("add" in tok.decode(ids[a:b]) for a, b in spans[:-1])  # the call is trained
    if reasoning:
        assert "Two plus four" in text
