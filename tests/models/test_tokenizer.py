"""The tokenizer contract fixes what silently breaks training and says what it changed."""

import pytest
from transformers import AutoTokenizer

from alignkit.config import ModelArguments
from alignkit.data.templates import CHATML
from alignkit.errors import ConfigError
from alignkit.models import apply_contract, load_tokenizer


@pytest.fixture
def pad_is_eos(tiny_llama):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.pad_token = tok.eos_token  # as SmolLM2 ships: pad == eos == <|im_end|>
    return tok


def test_pad_equal_to_eos_is_fixed_and_reported(pad_is_eos, caplog):
    eos = pad_is_eos.eos_token
    with caplog.at_level("WARNING"):
        changes = apply_contract(pad_is_eos, train_on_completions=True)
    assert pad_is_eos.pad_token != eos and pad_is_eos.pad_token_id != pad_is_eos.eos_token_id
    assert pad_is_eos.pad_token in pad_is_eos.get_vocab()  # an existing token: no embedding growth
    assert any("pad_token was eos" in c for c in changes)
    assert "pad_token was eos" in caplog.text


def test_pad_equal_to_eos_is_left_alone_when_not_training_on_completions(pad_is_eos):
    assert apply_contract(pad_is_eos) == []
    assert pad_is_eos.pad_token == pad_is_eos.eos_token


def test_missing_pad_is_set(pad_is_eos):
    pad_is_eos.pad_token = None
    changes = apply_contract(pad_is_eos)
    assert pad_is_eos.pad_token is not None and "pad_token was missing" in changes[0]


def test_missing_chat_template_is_set_for_chat_data(pad_is_eos):
    pad_is_eos.chat_template = None
    changes = apply_contract(pad_is_eos, chat=True)
    assert pad_is_eos.chat_template == CHATML and any("chat template" in c for c in changes)


def test_assistant_only_loss_needs_generation_marks(pad_is_eos):
    pad_is_eos.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ConfigError, match=r"\{% generation %\}.*Fix"):
        apply_contract(pad_is_eos, chat=True, assistant_only_loss=True)
    # A ChatML template without marks is never replaced (its own system prompt would be lost): rendering separates
    # its assistant turns, each ending on <|im_end|>, so it trains with those spans (issue 36, alignkit.data.chat_spans).
    unmarked = CHATML.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    pad_is_eos.chat_template = unmarked
    apply_contract(pad_is_eos, chat=True, assistant_only_loss=True)
    assert pad_is_eos.chat_template == unmarked and pad_is_eos.alignkit_template.source == "rendered"
    apply_contract(pad_is_eos, chat_template="chatml", chat=True, assistant_only_loss=True)
    assert pad_is_eos.chat_template == CHATML


def test_load_tokenizer_reports_changes():
    tok = load_tokenizer(ModelArguments(model_name_or_path="tiny:llama"), chat=True, train_on_completions=True)
    assert tok.alignkit_changes == []  # the tiny tokenizer already satisfies the contract
    assert tok.pad_token != tok.eos_token and "{% generation %}" in tok.chat_template


def test_replacing_a_template_that_adds_a_default_system_turn_says_so(pad_is_eos):
    # SmolLM2-Instruct's template (shortened): a conversation without a system turn gets the model's own
    smollm2_like = (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM<|im_end|>\n' }}{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    )
    pad_is_eos.chat_template = smollm2_like
    changes = apply_contract(pad_is_eos, chat_template="chatml_eos", chat=True)
    warning = [c for c in changes if "default system turn" in c]
    assert len(warning) == 1 and "You are a helpful AI assistant named SmolLM" in warning[0], changes
    pad_is_eos.chat_template = CHATML  # no default system turn: nothing to say
    assert not [c for c in apply_contract(pad_is_eos, chat_template="chatml_eos", chat=True) if "system" in c]
