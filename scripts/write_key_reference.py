"""Regenerate the key reference after a config dataclass changed: alignkit/config/keys.json (read by
``alignkit <stage> --help``) and docs/keys.md. tests/structure/test_key_reference.py fails until this is run.

    python scripts/write_key_reference.py
"""

from pathlib import Path

from alignkit.config.keyref import write_reference
from alignkit.tasks import key_reference

if __name__ == "__main__":
    write_reference(key_reference(), Path(__file__).resolve().parents[1] / "docs")
    print("wrote alignkit/config/keys.json and docs/keys.md")
