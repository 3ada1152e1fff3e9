#!/usr/bin/env bash
# Install alignkit and everything it needs from this repo's own files, on a fresh machine with no GPU.
# torch is pinned exactly: pip takes the CPU wheel from local disk; a looser pin pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip"
$PIP install -q "torch==2.13.0"
$PIP install -q -e ".[dev]"
