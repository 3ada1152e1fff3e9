"""The tokenizer contract: fix what silently breaks training, and say what was changed."""

from __future__ import annotations

import logging
from pathlib import Path

from alignkit.config.args import ModelArguments
from alignkit.data.chat_families import add_family_tokens, family_hint, family_names, prepare_chat_template
from alignkit.data.templates import (
    check_turn_ends,
    default_system_prompt,
    default_template,
    end_of_turn_ids,
    resolve_chat_template,
)
from alignkit.errors import ConfigError, PreflightError
from alignkit.models.sources import check_hub_name, resolve_source

logger = logging.getLogger(__name__)

# Existing tokens that serve well as a pad distinct from eos (no new embedding rows needed).
_PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>", "<|endoftext|>", "<unk>")


def load_tokenizer(
    model_args: ModelArguments,
    *,
    chat: bool = False,
    assistant_only_loss: bool = False,
    train_on_completions: bool = False,
    source=None,
):
    """Load the tokenizer and apply the contract. ``tokenizer.alignkit_changes`` lists what was changed."""
    from transformers import AutoTokenizer

    source = source or resolve_source(model_args)
    if model_args.tokenizer_name_or_path:  # a mistyped path or an unreachable Hub id: said at once, not after retries
        check_hub_name(model_args.tokenizer_name_or_path, "tokenizer_name_or_path", model_args.revision)
    name = model_args.tokenizer_name_or_path or source.adapter_dir or source.base
    kwargs = {"trust_remote_code": model_args.trust_remote_code, "revision": model_args.revision}
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    except OSError as exc:  # a Hub id without the Hub, a folder without tokenizer files
        from alignkit.models.sources import check_model_folder

        if Path(str(name)).is_dir():  # one line naming the folder and what it lacks
            check_model_folder(name, "tokenizer", weights=False)
        raise PreflightError(
            f"tokenizer: could not load '{name}' ({str(exc).splitlines()[0]}). Fix: point model_name_or_path (or "
            "tokenizer_name_or_path) at a local model directory or .gguf file; Hub ids need network access."
        ) from None
    changes = apply_contract(
        tokenizer,
        chat_template=model_args.chat_template,
        chat=chat,
        assistant_only_loss=assistant_only_loss,
        train_on_completions=train_on_completions,
        train_on_reasoning=model_args.train_on_reasoning,
    )
    tokenizer.alignkit_changes = changes
    return tokenizer


def _distinct_pad(tokenizer) -> str | None:
    vocab = tokenizer.get_vocab()
    for candidate in (*_PAD_CANDIDATES, tokenizer.unk_token):
        if candidate and candidate in vocab and candidate != tokenizer.eos_token:
            return candidate
    return None


def apply_contract(
    tokenizer,
    *,
    chat_template=None,
    chat=False,
    assistant_only_loss=False,
    train_on_completions=False,
    train_on_reasoning=True,
) -> list[str]:
    changes: list[str] = []
    if tokenizer.pad_token is None:
        pad = _distinct_pad(tokenizer) or tokenizer.eos_token
        tokenizer.pad_token = pad
        changes.append(f"pad_token was missing; set to {pad!r}")
    if train_on_completions and tokenizer.eos_token is not None and tokenizer.pad_token == tokenizer.eos_token:
        # With pad == eos, collators that mask padding by token id also mask every real eos: the model never
        # learns to stop. Use a distinct pad token.
        pad = _distinct_pad(tokenizer)
        if pad is None:
            pad = "<|pad|>"
            tokenizer.add_special_tokens({"pad_token": pad})
            changes.append(
                f"pad_token was eos {tokenizer.eos_token!r}; added a new token {pad!r} as pad (embeddings grow by one)"
            )
        else:
            changes.append(f"pad_token was eos {tokenizer.eos_token!r}; set to the distinct token {pad!r}")
            tokenizer.pad_token = pad
    if chat_template:
        own = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
        tokenizer.chat_template = resolve_chat_template(chat_template)
        changes.append("chat_template set from the recipe")
        dropped = default_system_prompt(tokenizer, own)
        if dropped and dropped not in (default_system_prompt(tokenizer, tokenizer.chat_template) or ""):
            changes.append(
                f"the model's own chat template adds a default system turn to conversations without one ({dropped[:80]!r}"
                f"{'...' if len(dropped) > 80 else ''}); the recipe's chat_template does not, so the model is trained "
                "and saved without it. Fix, to keep it: give that system message in the data (or in the template)"
            )
    elif chat and not tokenizer.chat_template:
        name, tokenizer.chat_template = default_template(tokenizer)
        why = (
            ""
            if name == "chatml"
            else f" (<|im_end|> is not a token of this vocabulary: turns end with eos {tokenizer.eos_token!r})"
        )
        changes.append(f"tokenizer had no chat template; set alignkit's '{name}' template{why}{family_hint(tokenizer)}")
    if chat:
        # Never replaced by another family's format: a family's stock template trains with its proven twin; any
        # template is checked by rendering, and refused with the fix if its assistant turns do not end on a stop
        # token (or, for assistant_only_loss, are not marked).
        if not train_on_reasoning and not assistant_only_loss:
            raise ConfigError(
                "train_on_reasoning: false masks the reasoning through the assistant-only loss mask. Fix: set "
                "assistant_only_loss: true, or train_on_reasoning: true."
            )
        installed = bool(chat_template) and chat_template in family_names()
        if installed:
            changes += add_family_tokens(tokenizer, chat_template)
        info = prepare_chat_template(
            tokenizer,
            installed=installed,
            assistant_only_loss=assistant_only_loss,
            train_on_reasoning=train_on_reasoning,
        )
        if info.family:
            logger.info("chat template: family %s (%s)", info.family, info.source)
        # spans found by rendering were checked to end on stop tokens (alignkit.data.chat_spans); they have no marks
        check_turn_ends(tokenizer, assistant_only_loss=assistant_only_loss and info.source != "rendered")
        tokenizer.alignkit_stop_ids = end_of_turn_ids(tokenizer)
    for change in changes:
        logger.warning("tokenizer contract: %s", change)
    return changes
