"""The Ollama Modelfile written beside every GGUF: ``FROM``, the family's ``TEMPLATE`` (Go template syntax),
``PARAMETER stop`` for every trained stop token, and the family's default ``SYSTEM`` prompt.

Where each piece comes from (one place each, nothing restated here):
- the family: :func:`alignkit.data.chat_families.identify` on the template the model folder saved (the one the run
  trained with and the GGUF embeds);
- the stop tokens: :func:`alignkit.data.templates.end_of_turn_ids` (what ``alignkit chat``, the merge's
  generation_config and the export gate stop on), written as token text;
- the default system prompt: what the saved template renders for a conversation without one.

``TEMPLATE`` and the stop parameters are Ollama's own, verbatim (:data:`OLLAMA_TEMPLATES`, from ollama/ollama's
``template/`` folder) for the families Ollama has a template for (:data:`OLLAMA_FOR_FAMILY`): what ``ollama create``
itself would pick when it recognises the GGUF's template, written out so that it does not depend on that guess.
Trained stop tokens missing from Ollama's list are added, except the tokenizer's eos, on which llama.cpp (and so
Ollama) always stops. Families without an Ollama template get no TEMPLATE line (Ollama then sends the bare prompt,
``{{ .Prompt }}``); the Modelfile and the log say so, and where Ollama's template renders other text than the trained
template (:data:`OLLAMA_DIFFERS`) they say that too.
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

# Ollama's own templates and stop parameters, verbatim: template/<name>.gotmpl and template/<name>.json of
# github.com/ollama/ollama at commit fb30760996871fa9460115c753afd2c60d4ab0f7 (2026-08-21); the test compares them
# with those files (tests/export/data/ollama/, with their source) and checks which one Ollama's own matcher
# (template.Named over template/index.json) picks for each family's stock template.
OLLAMA_TEMPLATES: dict[str, tuple[str, tuple[str, ...]]] = {
    "chatml": (
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
        ("<|im_start|>", "<|im_end|>"),
    ),
    "gemma-instruct": (
        '{{- $system := "" }}\n{{- range .Messages }}\n{{- if eq .Role "system" }}\n{{- if not $system }}'
        '{{ $system = .Content }}\n{{- else }}{{ $system = printf "%s\\n\\n%s" $system .Content }}\n{{- end }}\n'
        '{{- continue }}\n{{- else if eq .Role "user" }}<start_of_turn>user\n{{- if $system }}\n{{ $system }}\n'
        '{{- $system = "" }}\n{{- end }}\n{{- else if eq .Role "assistant" }}<start_of_turn>model\n{{- end }}\n'
        "{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n",
        ("<start_of_turn>", "<end_of_turn>"),
    ),
    "gemma3-instruct": (
        "{{- range $i, $_ := .Messages }}\n{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
        '{{- if eq .Role "user" }}<start_of_turn>user\n{{- if and (eq $i 1) $.System }}\n{{ $.System }}\n{{ end }}\n'
        '{{ .Content }}<end_of_turn>\n{{ else if eq .Role "assistant" }}<start_of_turn>model\n'
        "{{ .Content }}<end_of_turn>\n{{ end }}\n{{- if $last }}<start_of_turn>model\n{{ end }}\n{{- end }}\n",
        ("<end_of_turn>",),
    ),
    "llama3-instruct": (
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>\n"
        "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
    "mistral-instruct": (
        '[INST] {{ range $index, $_ := .Messages }}\n{{- if eq .Role "system" }}{{ .Content }}\n\n'
        '{{ else if eq .Role "user" }}{{ .Content }}[/INST]\n{{- else if eq .Role "assistant" }} {{ .Content }}'
        "</s>[INST] {{ end }}\n{{- end }}",
        ("<|im_start|>", "<|im_end|>"),  # sic: Ollama's published stop parameters for this template
    ),
    "phi-3": (
        "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n",
        ("<|end|>", "<|system|>", "<|user|>", "<|assistant|>"),
    ),
}
# chat-format family -> the Ollama template written for it. Where Ollama's matcher recognises the family's stock
# template (llama3, llama3_1, gemma, gemma3, mistral: exactly; smollm2: ChatML at distance 41), its pick. Also:
# alignkit's chatml (the issue: ChatML for chatml runs; its {% generation %} marks put it past the matcher's
# distance); phi3 and phi3_5, whose stock templates render Ollama's phi-3 layout (Ollama's matcher would pick
# zephyr for phi3's text, distance 97, which ends turns with </s>); qwen2_5, for which Ollama publishes no template:
# ChatML renders its layout for conversations without tools. The rest (llama3_2, qwen3, phi4, deepseek_r1_distill,
# gptoss, chatml_eos): no Ollama template; without a TEMPLATE line Ollama sends the bare prompt ({{ .Prompt }}).
OLLAMA_FOR_FAMILY = {
    "chatml": "chatml", "smollm2": "chatml", "qwen2_5": "chatml",
    "llama3": "llama3-instruct", "llama3_1": "llama3-instruct",
    "gemma": "gemma-instruct", "gemma3": "gemma3-instruct",
    "mistral": "mistral-instruct",
    "phi3": "phi-3", "phi3_5": "phi-3",
}  # fmt: skip
# Where Ollama's template renders other text than the family's stock template (the trained one) for some
# conversations: said in the Modelfile and the log.
OLLAMA_DIFFERS = {
    "llama3_1": "Ollama's llama3-instruct leaves out the stock template's 'Cutting Knowledge Date' system header and "
    "its tool layout",
    "mistral": "Ollama's mistral-instruct renders '[INST] question[/INST]' (Mistral v0.3's layout); the stock v0.2 "
    "template trained '[INST] question [/INST]'",
    "qwen2_5": "Ollama publishes no Qwen2.5 template; this is its ChatML one (Qwen2.5's layout without tools)",
    "gemma": "Ollama's gemma-instruct puts a system message in the first user turn (the stock template refuses one)",
}
GO_TEMPLATES = {family: OLLAMA_TEMPLATES[name][0] for family, name in OLLAMA_FOR_FAMILY.items()}


def default_system(tokenizer) -> str | None:
    """The system prompt the chat template inserts into a conversation that has none (SmolLM2's, Qwen2.5's), or
    None: found by rendering a one-turn conversation and reading the system turn before the user's text."""
    probe = "\u2063alignkit-probe\u2063"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": probe}], tokenize=False)
    except Exception:  # noqa: BLE001 - a template that needs more than one user turn has no default to read
        return None
    head = text.split(probe)[0]
    if "<|im_start|>system\n" in head:
        return head.split("<|im_start|>system\n", 1)[1].split("<|im_end|>", 1)[0] or None
    return None


def modelfile_text(model_dir: Path, gguf: Path) -> tuple[str, str | None]:
    """(the Modelfile's text for ``gguf`` exported from ``model_dir``, the family name or None)."""
    from transformers import AutoTokenizer

    from alignkit.data.chat_families import identify, saved_template
    from alignkit.data.templates import end_of_turn_ids

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    family = identify(saved_template(tokenizer) or tokenizer.chat_template)
    trained = [tokenizer.convert_ids_to_tokens(i) for i in end_of_turn_ids(tokenizer)]
    lines = [f"# Ollama Modelfile written by alignkit export gguf: ollama create NAME -f {gguf.name}.Modelfile",
             f"FROM ./{gguf.name}", ""]  # fmt: skip
    name = OLLAMA_FOR_FAMILY.get(family or "")
    if name:
        template, stops = OLLAMA_TEMPLATES[name]
        stops = [*stops, *(t for t in trained if t not in stops and t != tokenizer.eos_token)]
        lines += [f"# chat format: {family}; TEMPLATE and stop parameters: Ollama's own '{name}' (ollama/ollama,"
                  f" template/{name}.gotmpl and .json)"]  # fmt: skip
        if family in OLLAMA_DIFFERS:
            lines += [f"# note: {OLLAMA_DIFFERS[family]}."]
        lines += [f'TEMPLATE """{template}"""', ""]
    else:
        stops = trained
        lines += [
            f"# chat format: {family or 'not a known family'}: Ollama publishes no template for it, and without a",
            "# TEMPLATE line Ollama sends the bare prompt ({{ .Prompt }}): write a TEMPLATE (Go syntax) rendering the",
            "# chat template embedded in the GGUF before use, and check it with `ollama show NAME --template`.",
            "",
        ]
    system = default_system(tokenizer)
    if system:
        lines += [f'SYSTEM """{system}"""', ""]
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n", family


def write_modelfile(model_dir: Path, gguf: Path) -> Path:
    """Write ``<gguf>.Modelfile`` beside the GGUF (replacing an earlier one) and return its path."""
    text, family = modelfile_text(Path(model_dir), Path(gguf))
    if family not in OLLAMA_FOR_FAMILY:
        logger.warning(
            "%s: Ollama publishes no template for the chat format %s; the Modelfile has no TEMPLATE line (Ollama "
            "would send the bare prompt): write one before `ollama create`",
            gguf.name, family or "(not a known family)",
        )  # fmt: skip
    elif family in OLLAMA_DIFFERS:
        logger.warning("%s: the Modelfile uses Ollama's template; %s", gguf.name, OLLAMA_DIFFERS[family])
    path = gguf.with_name(gguf.name + ".Modelfile")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path
