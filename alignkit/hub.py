"""Whether the Hugging Face Hub can be reached, asked once per process; when it cannot, the process goes offline.

Every reader of a Hub id (a model, tokenizer, adapter's base, teacher or reward model through
``alignkit.models.sources``; a Hub dataset through ``alignkit.data``; a push) asks :func:`hub_unreachable` first.
The first time the Hub does not answer, :func:`go_offline` switches the Hugging Face libraries to offline mode for the
rest of the process and says so once, so a cached Hub id loads from the cache at once instead of after
huggingface_hub's retries (5 per file, with backoff: minutes of warnings for one model).

How the libraries read offline mode at run time (their own environment variables are read once, at import):
huggingface_hub 2.4 ``constants.is_offline_mode()`` returns ``constants.HF_HUB_OFFLINE`` (transformers 5.23 calls
it before each Hub request and then loads with ``local_files_only``; huggingface_hub's HTTP session refuses any
request); peft 0.18 reads ``constants.HF_HUB_OFFLINE`` and the ``HF_HUB_OFFLINE`` environment variable; datasets 5.2
copies the flag into ``datasets.config.HF_HUB_OFFLINE`` at import (``HF_DATASETS_OFFLINE`` is its old alias). Child
processes (the ranks of a launch, subprocesses) read the environment variable.
"""

from __future__ import annotations

import functools
import logging
import os
import sys

logger = logging.getLogger(__name__)

_offline_because: str | None = None  # why this process went offline (set once, by go_offline)


def hub_unreachable() -> str | None:
    """Why the Hub cannot be reached from here, said at once: ``HF_HUB_OFFLINE`` set, or no TCP connection to
    ``HF_ENDPOINT`` (default https://huggingface.co) within 3 s (a failed DNS lookup fails at once); then the process
    has gone offline (:func:`go_offline`). None when it answers, or when a proxy is configured (then huggingface_hub's
    own requests decide). Probed once per process."""
    if _offline_because:
        return _offline_because
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    why = _probe(constants.ENDPOINT)
    if why:
        go_offline(why)
    return why


@functools.cache
def _probe(endpoint: str) -> str | None:
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=3).close()
    except OSError as exc:
        return f"{url.hostname}:{port} does not answer ({exc.strerror or exc})"
    return None


def go_offline(why: str) -> None:
    """Offline mode for huggingface_hub, transformers, peft and datasets in this process and its children, said once
    on the console with ``why``."""
    global _offline_because
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"  # children, peft, and datasets if it is imported later
    constants.HF_HUB_OFFLINE = True  # huggingface_hub, transformers and peft read it at each request
    if (datasets_config := sys.modules.get("datasets.config")) is not None:  # copied at its import
        datasets_config.HF_HUB_OFFLINE = datasets_config.HF_DATASETS_OFFLINE = True
    if _offline_because is None:
        logger.warning(
            "The Hugging Face Hub cannot be reached (%s): working offline (HF_HUB_OFFLINE=1), Hub models and datasets "
            "load from the local cache only.",
            why,
        )
    _offline_because = why
