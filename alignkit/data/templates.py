"""Chat templates. alignkit's ChatML marks assistant turns with {% generation %} so trl can build assistant-only
loss masks (``return_assistant_tokens_mask``)."""

from __future__ import annotations

from pathlib import Path

CHATML = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

NAMED_TEMPLATES = {"chatml": CHATML}


def resolve_chat_template(spec: str) -> str:
    """A template name ('chatml'), a path to a .jinja file, or a literal Jinja string."""
    if spec in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[spec]
    path = Path(spec).expanduser()
    if "{{" not in spec and "{%" not in spec and path.is_file():  # checked to exist (ModelArguments)
        return path.read_text(encoding="utf-8-sig")
    return spec


def marks_assistant_turns(template: str | None) -> bool:
    return bool(template) and "{% generation %}" in template.replace("{%- generation %}", "{% generation %}")
