"""Chat-template families: recognise a tokenizer's stock template, train with its twin, and prove the twin by rendering.

A *family* is a model family's own instruct template as its model repository ships it (the *stock* template: trl
1.16 stores about 20 of them, byte-identical, in ``trl/chat_templates/<name>.jinja``; alignkit stores the few trl
lacks in ``alignkit/data/chat_templates/``) plus a *twin*: the same template with ``{% generation %}`` marks around
what the assistant emits, so transformers' ``return_assistant_tokens_mask`` gives trl assistant-only loss masks.

Twins come from trl (``trl.chat_template_utils.get_training_chat_template``, the ``*_training.jinja`` files) or, where
trl has none or trl's twin renders other text than the stock template (trl's Qwen3 twin always renders a think
block, which the stock template renders only after the last user turn), from :data:`PATCHES`: the stock text with
marks inserted by exact string replacement (each replaced piece must occur the stated number of times, checked).
Either way :func:`prove_twin` renders the probe conversations (:mod:`alignkit.data.chat_probes`) with both templates
for every run and accepts the twin only if the text is identical and every assistant turn's marked span ends on a
stop token. Family names follow trl's template file names.
"""

from __future__ import annotations

import copy
import functools
import re
from dataclasses import dataclass
from pathlib import Path

from alignkit.data.chat_patches import PATCHES, patch
from alignkit.errors import ConfigError

_OWN_DIR = Path(__file__).parent / "chat_templates"


def _trl_dir() -> Path:
    import trl.chat_template_utils as ctu

    return Path(ctu.__file__).parent / "chat_templates"


@dataclass(frozen=True)
class Family:
    """One family: ``stock`` names its stock template file(s) (trl's or alignkit's), ``end_of_turn`` the special
    token that closes an assistant turn (what generation must stop on), ``twin`` where the training twin comes from
    ('trl': trl's ``<stock>_training.jinja``; 'patch': :data:`PATCHES`; 'own': already marked)."""

    name: str
    end_of_turn: str
    twin: str
    stock_dir: str = "trl"  # 'trl' or 'alignkit'
    note: str = ""

    def stock_path(self) -> Path:
        return (_trl_dir() if self.stock_dir == "trl" else _OWN_DIR) / f"{self.name}.jinja"


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("llama3", "<|eot_id|>", "trl"),
        Family("llama3_1", "<|eot_id|>", "patch"),
        Family("llama3_2", "<|eot_id|>", "patch"),
        Family("qwen2_5", "<|im_end|>", "trl"),
        Family("qwen3", "<|im_end|>", "patch", note="trl's twin renders think blocks the stock template leaves out"),
        Family("gemma", "<end_of_turn>", "trl"),
        Family("gemma3", "<end_of_turn>", "trl"),
        Family("phi3", "<|end|>", "trl"),
        Family("phi3_5", "<|end|>", "trl"),
        Family("deepseek_r1_distill", "<｜end▁of▁sentence｜>", "trl"),
        Family("gptoss", "<|return|>", "trl"),
        # Verbatim copies of public templates (a .jinja file cannot carry a comment without changing its bytes):
        # mistral.jinja == Mistral-7B-Instruct-v0.2's template and phi4.jinja == microsoft/phi-4's as released, as
        # llama.cpp records them in its chat-template tests (ggml-org/llama.cpp, tests/test-chat-template.cpp,
        # test cases "mistralai/Mistral-7B-Instruct-v0.2 (NOTE: Old pre-v1 without a system prompt)" and "phi-4",
        # commit 03f94f19a2c4c9d039fa1a84838fe3e2110cc28d); tests/data/test_chat_families.py pins both.
        Family("mistral", "</s>", "patch", stock_dir="alignkit"),
        Family("phi4", "<|im_end|>", "patch", stock_dir="alignkit", note="the user turn opens the assistant's"),
        Family("smollm2", "<|im_end|>", "patch", stock_dir="alignkit"),
    )
}
# alignkit's own ChatML layouts (already marked; chatml_eos ends turns with the tokenizer's eos).
OWN_FAMILIES = ("chatml", "chatml_eos")


def family_names() -> tuple[str, ...]:
    """Every name ``chat_template:`` accepts as a family (trl's template file names, plus alignkit's)."""
    return (*OWN_FAMILIES, *FAMILIES)


@functools.cache
def stock_template(name: str) -> str:
    """The stock template text of family ``name`` (byte-identical to the file trl or alignkit stores)."""
    if name in OWN_FAMILIES:
        from alignkit.data.templates import NAMED_TEMPLATES

        return NAMED_TEMPLATES[name]
    return FAMILIES[name].stock_path().read_text(encoding="utf-8")


@functools.cache
def twin_template(name: str, train_on_reasoning: bool = True) -> str:
    """The training twin of family ``name``: ``{% generation %}`` marks around the assistant's output. With
    ``train_on_reasoning`` false, the twin that leaves the reasoning block outside the marks (ConfigError for a
    family without one)."""
    if name in OWN_FAMILIES:
        return stock_template(name)
    family = FAMILIES[name]
    if not train_on_reasoning:
        key = f"{name}:no_reasoning"
        if key not in PATCHES:
            have = sorted(k.split(":")[0] for k in PATCHES if k.endswith(":no_reasoning"))
            raise ConfigError(
                f"train_on_reasoning: false needs a twin of the '{name}' template that leaves the reasoning "
                f"untrained; alignkit has one for {have}. Fix: set train_on_reasoning: true, or use one of those "
                "families' templates."
            )
        return patch(stock_template(name), PATCHES[key])
    if family.twin == "trl":
        return (_trl_dir() / f"{name}_training.jinja").read_text(encoding="utf-8")
    return patch(stock_template(name), PATCHES[name])


def identify(template) -> str | None:
    """The family whose stock template (or twin) ``template`` is, exactly; None for any other text."""
    if isinstance(template, dict):
        template = template.get("default")
    if not isinstance(template, str):
        return None
    for name in family_names():
        if template == stock_template(name):
            return name
    for name in FAMILIES:
        if template == twin_template(name):
            return name
    return None


def end_of_turn_token(name: str, tokenizer) -> str | None:
    """The token family ``name`` closes assistant turns with (chatml_eos: the tokenizer's eos)."""
    if name == "chatml":
        return "<|im_end|>"
    if name == "chatml_eos":
        return tokenizer.eos_token
    return FAMILIES[name].end_of_turn


_EOS = "\x00alignkit-eos\x00"  # what a template's eos_token renders as while its turn ends are read off


@functools.cache
@functools.cache  # the family's twin and the probes are fixed: rendered once per process
def stop_tokens(name: str) -> tuple[str, ...]:
    """Every marker token family ``name``'s template ends an assistant turn with where generation must stop, in any
    of its branches: its end-of-turn token first, then what a tool call, a built-in tool call (Llama 3.1's
    ``<|eom_id|>``) or a reasoning turn ends on (gpt-oss: ``<|call|>``). Found by rendering the training twin with
    each probe of :mod:`alignkit.data.chat_probes` cut after every assistant turn that a reply ends (one followed by
    a tool result, or the conversation's end: where a sampler stops) and reading the marker the turn's
    ``{% generation %}`` span ends on, whitespace after it allowed; a turn ending on the tokenizer's eos adds
    nothing (eos is always a stop). No tokenizer needed: the GGUF export checks llama.cpp's vocabulary with it."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from alignkit.data.chat_probes import PROBES

    found = [] if name == "chatml_eos" else [end_of_turn_token(name, None)]
    twin = twin_template(name)
    for messages, kwargs in PROBES.values():
        for i, message in enumerate(messages):
            if message["role"] != "assistant" or (i + 1 < len(messages) and messages[i + 1]["role"] == "user"):
                continue
            try:
                (text,), (marks,) = render_jinja_template(
                    [messages[: i + 1]], chat_template=twin, return_assistant_tokens_mask=True,
                    bos_token="", eos_token=_EOS, **kwargs,
                )  # fmt: skip
            except Exception:  # noqa: BLE001 - a template's refusal of the probe: that branch does not exist
                continue
            end = max((b for a, b in marks), default=0)
            tail = text[:end].rstrip()
            ends = [m for m in _MARKER.finditer(tail) if m.end() == len(tail)]
            if ends and ends[-1].group() not in found:
                found.append(ends[-1].group())
    return tuple(found)


@dataclass
class TemplateInfo:
    """What a run trains with: the ``family`` (None: an unknown template), the template ``source`` ('stock': the
    tokenizer's own, marked already or not needing marks; 'twin': the stock template's training twin, proven;
    'installed': a family template the recipe installed; 'rendered': a custom template without generation marks whose
    assistant spans come from rendering, :mod:`alignkit.data.chat_spans`), the ``stock`` text the model is saved with, and what the
    template renders (:class:`alignkit.data.chat_probes.Features`)."""

    family: str | None
    source: str
    stock: str | None
    features: object = None


def prepare_chat_template(
    tokenizer, *, installed: bool = False, assistant_only_loss: bool = False, train_on_reasoning: bool = True
) -> TemplateInfo:
    """Recognise the tokenizer's template; for assistant-only loss on a family's stock template, swap in its
    training twin after :func:`alignkit.data.chat_probes.prove_twin` proved it on this tokenizer. Sets
    ``tokenizer.alignkit_template`` (a :class:`TemplateInfo`); the stock text is what the run saves."""
    from alignkit.data.chat_probes import prove_twin, template_features

    template = tokenizer.chat_template
    name = identify(template)
    source = "installed" if installed else "stock"
    if name is None or name in OWN_FAMILIES:
        features = template_features(tokenizer, template) if template else None
        if name is None and features is not None and assistant_only_loss and not _marked(tokenizer, template):
            from alignkit.data.chat_spans import SOURCE, check_probes

            check_probes(tokenizer, template, features.accepted)  # spans by rendering, or ConfigError
            source = SOURCE
        info = TemplateInfo(name, source, template, features)
    else:
        stock = stock_template(name)
        if assistant_only_loss:
            twin = twin_template(name, train_on_reasoning)
            features = prove_twin(tokenizer, stock, twin, name)
            if twin != template:
                tokenizer.chat_template = twin
                source = "installed, twin" if installed else "twin"
        else:
            features = template_features(tokenizer, stock)
        info = TemplateInfo(name, source, stock, features)
    tokenizer.alignkit_template = info
    return info


def _marked(tokenizer, template) -> bool:
    from alignkit.data.chat_spans import has_generation_marks
    from alignkit.data.templates import accepted_probe

    return has_generation_marks(tokenizer, template, accepted_probe(tokenizer, template))


def saved_template(tokenizer) -> str | None:
    """The template a run saves: the family's stock text when training used its twin, else the tokenizer's."""
    info = getattr(tokenizer, "alignkit_template", None)
    return info.stock if info is not None and info.stock else tokenizer.chat_template


_SENTENCE_ENDS = ("</s>", "<｜end▁of▁sentence｜>")  # end-of-turn tokens that are a family's plain eos, not a chat mark


def families_in_vocabulary(tokenizer) -> list[str]:
    """Families whose end-of-turn token is one token of ``tokenizer``'s vocabulary and not its plain eos, and whose
    other marker tokens (:func:`marker_tokens`) are too (a base Gemma's ``<start_of_turn>``/``<end_of_turn>``:
    ``gemma``, ``gemma3``): the formats a base model of that family can train in without new embedding rows (tokens
    this run added are not counted). Used to name the fix when a recipe's ChatML does not fit (issue 36, case 1)."""
    out, added = [], set(getattr(tokenizer, "alignkit_new_token_ids", None) or ())

    def have(token):
        return _one_token(tokenizer, token) and tokenizer.convert_tokens_to_ids(token) not in added

    for name, family in FAMILIES.items():
        token = family.end_of_turn
        if token == tokenizer.eos_token or token in _SENTENCE_ENDS:
            continue
        if all(have(t) for t in marker_tokens(name, tokenizer)):
            out.append(name)
    return out


def family_hint(tokenizer) -> str:
    """'; this vocabulary has <end_of_turn>, the end-of-turn of chat_template: gemma, gemma3 (its family's own
    format, no new tokens)' or '' (see :func:`families_in_vocabulary`)."""
    names = families_in_vocabulary(tokenizer)
    if not names:
        return ""
    tokens = sorted({FAMILIES[n].end_of_turn for n in names})
    return (
        f"; this vocabulary has {', '.join(tokens)}, the end-of-turn token of chat_template: {', '.join(names)} "
        "(the family's own format, no new tokens)"
    )


# A turn or structure marker a template writes as one special token: gpt-oss/Llama 3/Phi/ChatML's <|...|>,
# DeepSeek's full-width <｜...｜>, Gemma's <start_of_turn>/<end_of_turn>. Tags such as <think> and <tool_call> are
# content the assistant writes inside its turn (the real Qwen/DeepSeek vocabularies hold them as ordinary, non-special
# tokens) and Mistral v0.2's [INST] is plain text in its vocabulary: neither is a marker here.
_MARKER = re.compile(r"<\|[^|<>\s{}]{1,40}\|>|<｜[^｜<>\s{}]{1,40}｜>|<(?:start|end)_of_turn>")
_JINJA_COMMENT = re.compile(r"\{#.*?#\}", re.S)


@functools.cache
def _template_markers(name: str) -> tuple[str, ...]:
    text = _JINJA_COMMENT.sub("", stock_template(name) + twin_template(name))
    return tuple(dict.fromkeys(_MARKER.findall(text)))


def marker_tokens(name: str, tokenizer) -> tuple[str, ...]:
    """Every special token family ``name``'s template writes as a turn or structure marker, its end-of-turn token
    first, then the rest in the order the template text has them (gpt-oss: <|return|>, <|start|>, <|end|>,
    <|message|>, <|channel|>, <|call|>). Derived from the template text (stock and twin, Jinja comments left out),
    so every family's set follows its template. chatml_eos: the tokenizer's eos only (its <|im_start|> is text)."""
    token = end_of_turn_token(name, tokenizer)
    if name == "chatml_eos":
        return (token,) if token else ()
    return tuple(dict.fromkeys([t for t in (token,) if t] + list(_template_markers(name))))


def _one_token(tokenizer, token: str) -> bool:
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    return len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids[0]) == token


def add_family_tokens(tokenizer, name: str) -> list[str]:
    """Make every marker token of family ``name`` (:func:`marker_tokens`: its end-of-turn token and turn
    delimiters) one special token of the vocabulary, as trl's ``clone_chat_template`` adds the source's tokens: used
    as is where the vocabulary has it (a base Gemma's ``<start_of_turn>``/``<end_of_turn>``), else added, so no
    marker is split into pieces (a split end-of-turn of an earlier turn would end its trained span off the stop
    token, and generation could not stop on it). ``tokenizer.alignkit_new_token_ids`` lists added ids (their
    embedding rows are trained and saved with the adapter). Returns what changed, for the contract's report."""
    tokenizer.alignkit_new_token_ids = []
    markers = marker_tokens(name, tokenizer)
    missing = [t for t in markers if not _one_token(tokenizer, t)]
    unmarked = [t for t in markers if t not in missing and t not in tokenizer.all_special_tokens]
    if unmarked:
        tokenizer.add_special_tokens({"additional_special_tokens": unmarked}, replace_extra_special_tokens=False)
    if not missing:
        return []
    tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    tokenizer.alignkit_new_token_ids = [tokenizer.convert_tokens_to_ids(t) for t in missing]
    n = len(missing)
    return [
        f"chat_template {name}: its marker token{'s' if n > 1 else ''} {', '.join(map(repr, missing))} "
        f"{'are' if n > 1 else 'is'} not in the vocabulary; added {'them' if n > 1 else 'it'} as special "
        f"token{'s' if n > 1 else ''} (embeddings grow by {n}; {'their' if n > 1 else 'its'} rows are trained and "
        "saved with the adapter)"
    ]


def save_tokenizer(tokenizer, folder, model=None) -> None:
    """Save ``tokenizer`` with the template the model is served with (the family's stock text, not the training
    twin) and, for a generating ``model``, a ``generation_config.json`` that stops on the end-of-turn ids."""
    training = tokenizer.chat_template
    tokenizer.chat_template = saved_template(tokenizer)
    try:
        tokenizer.save_pretrained(str(folder))
    finally:
        tokenizer.chat_template = training
    stops = getattr(tokenizer, "alignkit_stop_ids", None)
    gen = getattr(model, "generation_config", None)
    if stops and gen is not None:
        gen = copy.deepcopy(gen)
        gen.eos_token_id = list(stops)
        gen.pad_token_id = tokenizer.pad_token_id
        gen.save_pretrained(str(folder))
