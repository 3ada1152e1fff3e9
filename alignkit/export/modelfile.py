"""The Ollama Modelfile written beside every GGUF: ``FROM``, the family's ``TEMPLATE`` (Go template syntax),
``PARAMETER stop`` for every trained stop token, and the family's default ``SYSTEM`` prompt.

Where each piece comes from (one place each, nothing restated here):
- the family: :func:`alignkit.data.chat_families.identify` on the template the model folder saved (the one the run
  trained with and the GGUF embeds);
- the stop tokens: :func:`alignkit.data.templates.end_of_turn_ids` (what ``alignkit chat``, the merge's
  generation_config and the export gate stop on), written as token text;
- the default system prompt: what the saved template renders for a conversation without one.

``TEMPLATE`` is alignkit's Go-template rendering of the family's layout over Ollama's ``.Messages`` (Ollama puts the
Modelfile's ``SYSTEM`` in front as a system message when a conversation has none, so the templates only range over
messages). Families without one here (:data:`GO_TEMPLATES`) get no TEMPLATE line: Ollama then reads the chat template
embedded in the GGUF and uses its own matching template when it recognises it; the Modelfile and the log say so.
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

_CHATML = """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""
_GEMMA = """{{- $system := "" }}
{{- range .Messages }}
{{- if eq .Role "system" }}{{ $system = .Content }}
{{- else if eq .Role "user" }}<start_of_turn>user
{{ if $system }}{{ $system }}

{{ $system = "" }}{{ end }}{{ .Content }}<end_of_turn>
{{ else }}<start_of_turn>model
{{ .Content }}<end_of_turn>
{{ end }}
{{- end }}<start_of_turn>model
"""
_LLAMA3 = """{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}<|start_header_id|>assistant<|end_header_id|>

"""
# chat-format family -> Ollama TEMPLATE (Go text/template over .Messages).
GO_TEMPLATES = {
    "chatml": _CHATML, "smollm2": _CHATML, "qwen2_5": _CHATML,
    "gemma": _GEMMA, "gemma3": _GEMMA,
    "llama3": _LLAMA3,
}  # fmt: skip


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
    stops = [tokenizer.convert_ids_to_tokens(i) for i in end_of_turn_ids(tokenizer)]
    lines = [f"# Ollama Modelfile written by alignkit export gguf: ollama create NAME -f {gguf.name}.Modelfile",
             f"FROM ./{gguf.name}", ""]  # fmt: skip
    template = GO_TEMPLATES.get(family or "")
    if template:
        lines += [f"# chat format: {family} (the template the model was trained with, in Ollama's Go syntax)"]
        lines += [f'TEMPLATE """{template}"""', ""]
    else:
        lines += [
            f"# chat format: {family or 'not a known family'}: alignkit has no Ollama TEMPLATE for it; Ollama reads",
            "# the chat template embedded in the GGUF (check `ollama show NAME --template` before use).",
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
    if family not in GO_TEMPLATES:
        logger.warning(
            "%s: the chat format %s has no Ollama TEMPLATE in alignkit; the Modelfile leaves it to the template "
            "embedded in the GGUF",
            gguf.name, family or "(not a known family)",
        )  # fmt: skip
    path = gguf.with_name(gguf.name + ".Modelfile")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path
