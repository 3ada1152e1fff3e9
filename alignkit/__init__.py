"""alignkit: parameter-efficient LLM fine-tuning and alignment (README.md, docs/)."""

import os

# trl's trainers and huggingface_hub report usage to the Hub (``/api/telemetry/...``) on every run unless told not
# to; alignkit sends nothing it was not asked to. Set HF_HUB_DISABLE_TELEMETRY=0 to allow it.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# Known third-party lines that say nothing about a run are dropped (alignkit/quiet.py); -v or ALIGNKIT_VERBOSE=1
# shows them.
from alignkit import quiet  # noqa: E402

quiet.install()
