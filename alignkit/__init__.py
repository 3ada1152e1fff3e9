"""alignkit: parameter-efficient LLM fine-tuning and alignment (README.md)."""

import os

# trl's trainers and huggingface_hub report usage to the Hub (``/api/telemetry/...``) on every run unless told not
# to; alignkit sends nothing it was not asked to. Set HF_HUB_DISABLE_TELEMETRY=0 to allow it.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
