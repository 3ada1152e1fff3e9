"""The memory plan: what one training step needs per rank, from the model's ``config.json`` and the recipe alone (no
weights loaded), a throughput estimate, and whether it fits the device; ``alignkit plan`` prints it, and every stage
prints it and refuses a run that clearly cannot fit before anything loads (:func:`preflight`).

What is counted, per rank (bytes):

- **weights** at their storage dtype: full precision (fp32 on CPU, bf16 on GPUs with 'auto'), or 4-bit (nf4/fp4:
  0.5 B per quantized weight plus the quantization state: an fp32 absmax per 64 weights, or with double quantization
  a uint8 absmax per 64 and an fp32 one per 256 blocks); bitsandbytes quantizes the decoder's Linear layers only, and
  peft's ``prepare_model_for_kbit_training`` casts everything else (embeddings, norms, LM head) to fp32.
- **LoRA** parameters (``lora_r`` x (in + out) per targeted Linear), fp32; **gradients** of what trains; **optimizer**
  state (AdamW: two fp32 moments per trained parameter; 8-bit AdamW: two bytes; DeepSpeed adds an fp32 master copy
  of 16-bit trained weights); DPO/KTO with an adapter keep trl's frozen ``ref`` copy of it.
- **activations** kept for the backward pass: per layer and token, the norms' inputs and outputs, q/k/v after RoPE
  and the attention output (SDPA/flash attention: no sequence x sequence matrix; ``eager`` adds it), the MLP's
  intermediates (gate, up, activation, product), and with ``lora_dropout`` > 0 each adapted Linear's dropped input
  and its mask (peft draws one per module). With activation checkpointing only each layer's input is kept, plus one
  layer recomputed during the backward pass. Preference stages (DPO, ORPO, SimPO, KTO, reward) run chosen and
  rejected rows together: twice the sequences.
- **logits**: alignkit's SFT/DPO/CPT steps never hold the full ``tokens x vocabulary`` logits: trl's fused LM head
  works in chunks (on CPU alignkit's ``cpu_lm_head`` keeps the forward's fp32 probabilities for backward while they
  fit in 1 GiB, and projects chunks of at most 256 MiB; on GPU trl's Triton kernel tiles the vocabulary). The DPO/KTO
  reference pass runs without gradients: one layer's activations at a time, nothing kept.
- **ZeRO**: stage 2 splits gradients and optimizer state over the ranks, stage 3 the weights too (plus one layer
  gathered at a time); offload moves optimizer state (and, with ``zero3_offload``, parameters) to CPU memory.
- **the process**: on CPU the peak RSS includes Python, torch/transformers/trl and the tokenizer: a constant measured
  on this project's machines (:data:`CPU_PROCESS_BYTES`), plus what alignkit's allocator setting keeps in the heap
  and bitsandbytes' fp32 dequantization temporaries (:data:`CPU_HEAP_TOKEN_ROWS`, :data:`CPU_4BIT_TOKEN_ROWS`,
  measured: docs/planning.md); on GPU the CUDA context and the
  allocator's fragmentation (:data:`CUDA_CONTEXT_BYTES`, :data:`GPU_FRAGMENTATION`).

Throughput: FLOPs per token: trl's forward figure (``trl.trainer.utils.compute_flops_per_token`` / 3) times the
passes (full fine-tuning 3: forward, activation and weight gradients; LoRA 2: frozen weights need no gradients; one
more forward with checkpointing and for the reference pass), divided by a device's dense bf16 peak (trl's
``get_peak_flops`` table, :data:`GPUS` for cards it lacks) times an assumed utilisation (:data:`MFU`); on CPU the
GEMM probe's fp32 rate (``alignkit.runtime.gemm_probe``).

Validated against measured peak RSS and published GPU figures in docs/planning.md (``benchmarks/plan_check.py``).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from alignkit import runtime
from alignkit.errors import AlignkitError, ConfigError, PreflightError

logger = logging.getLogger("alignkit")

GiB = 1 << 30
MiB = 1 << 20
# Architecture facts (config.json) of models the GPU recipes and docs/planning.md name, shipped so that the planner
# works without the Hub: alignkit/train/model_configs/<org>--<name>.json, each with its "_source".
CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"

# ------------------------------------------------------------------ devices
# name: (memory in GiB as the driver reports it, dense bf16 tensor TFLOP/s from the vendor's data sheet)
GPUS: dict[str, tuple[float, float]] = {
    "RTX3090": (24.0, 71.0),
    "RTX4090": (24.0, 165.2),
    "A10": (24.0, 125.0),
    "L4": (22.5, 121.0),
    "A6000": (48.0, 154.8),
    "L40S": (48.0, 362.0),
    "A100-40GB": (40.0, 312.0),
    "A100-80GB": (80.0, 312.0),
    "H100": (79.6, 989.0),
    "H100-PCIe": (79.6, 756.0),
    "H200": (140.4, 989.0),
}
# a bare size ("24GB") plans for that much memory at a typical card's rate of that size
GENERIC_GPUS = {24: "RTX4090", 40: "A100-40GB", 48: "A6000", 80: "A100-80GB", 141: "H200"}
MFU = {
    "gpu": 0.40,
    "gpu_4bit": 0.28,
    "cpu": 0.30,
}  # assumed model-FLOPs utilisation (bitsandbytes dequantizes per matmul)

# ------------------------------------------------------------------ measured constants (docs/planning.md)
# CPU: peak RSS of a whole run of the tiny model (python, torch, transformers, trl, peft, datasets, bitsandbytes
# imported; the trainer built; a 2-layer model), measured on the project's Xeon; the planner adds the rest to it.
CPU_PROCESS_BYTES = 650 * MiB
# the tokenizer's memory grows with its vocabulary (SmolLM2 49,152 entries; Gemma 3 262,144)
CPU_TOKENIZER_BYTES_PER_ENTRY = 600
# CPU, measured on the project's Xeon (benchmarks/plan_check.py; docs/planning.md): what the heap keeps of a step's
# freed temporaries, in rows of hidden + intermediate per token and layer, and of bitsandbytes' dequantized weights
# (one fp32 copy plus rows per token and layer, without / with activation checkpointing)
CPU_HEAP_TOKEN_ROWS = 4.0
CPU_4BIT_TOKEN_ROWS = {False: 1.7, True: 4.5}
# while the weights load, the share of the checkpoint's file whose mapped pages count in the peak RSS
CPU_LOAD_FILE_SHARE = 1.0
CUDA_CONTEXT_BYTES = int(0.75 * GiB)  # CUDA context, cuBLAS/cuDNN workspaces: outside torch's allocator
GPU_FRAGMENTATION = 0.08  # the caching allocator's reserve over what tensors hold at the peak
# a refusal needs the estimate to exceed the device by this factor: the planner is validated to +-15%
REFUSE_MARGIN = 1.0 / 0.85
SKIP_ENV = "ALIGNKIT_SKIP_MEMORY_CHECK"

PREFERENCE_STAGES = {"dpo": 2, "orpo": 2, "simpo": 2, "kto": 2, "reward": 2}
REFERENCE_STAGES = {"dpo", "kto"}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GATED_MLP = {"gpt2": False, "gpt_neox": False, "opt": False, "bert": False, "phi": False, "falcon": False,
             "bloom": False, "gptj": False, "starcoder2": False, "roberta": False, "distilbert": False}  # fmt: skip
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# other families' names for the same Linear layers (lora_target_modules may use them)
LINEAR_ALIASES = {"c_attn": ("q_proj", "k_proj", "v_proj"), "qkv_proj": ("q_proj", "k_proj", "v_proj"),
                  "query_key_value": ("q_proj", "k_proj", "v_proj"), "dense": ("o_proj",), "out_proj": ("o_proj",),
                  "c_proj": ("o_proj", "down_proj"), "w1": ("gate_proj",), "w3": ("up_proj",), "w2": ("down_proj",),
                  "fc1": ("up_proj",), "fc2": ("down_proj",), "gate_up_proj": ("gate_proj", "up_proj"),
                  "dense_h_to_4h": ("up_proj",), "dense_4h_to_h": ("down_proj",)}  # fmt: skip


# ------------------------------------------------------------------ the model, from config.json
@dataclass(frozen=True)
class Arch:
    """A decoder's shape, from its ``config.json`` (``text_config`` for a multimodal one). Sizes in elements."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    gated: bool = True
    experts: int = 1  # MoE: experts per layer (all held in memory)
    active_experts: int = 1  # MoE: experts each token runs through
    norms_per_layer: int = 2  # RMSNorm/LayerNorm vectors of size hidden per layer
    qk_norm: bool = False  # per-head q/k norms (Gemma 3, Qwen 3)
    qkv_bias: bool = False
    stored_bytes: int = 2  # bytes per parameter of the checkpoint's weights (config 'dtype' / 'torch_dtype')

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Arch:
        """From a ``config.json`` dict; ConfigError naming the missing field when it is not a decoder's."""
        config = config.get("text_config") or config
        get = lambda *names, default=None: next((config[n] for n in names if config.get(n) is not None), default)  # noqa: E731
        hidden = get("hidden_size", "n_embd", "d_model")
        layers = get("num_hidden_layers", "n_layer", "num_layers")
        heads = get("num_attention_heads", "n_head")
        vocab = get("vocab_size")
        missing = [n for n, v in (("hidden_size", hidden), ("num_hidden_layers", layers),
                                  ("num_attention_heads", heads), ("vocab_size", vocab)) if v is None]  # fmt: skip
        if missing:
            raise ConfigError(
                f"the model config has no {missing}: the planner needs a decoder's config.json. Fix: pass the model's "
                "config with --model_config path/config.json."
            )
        model_type = str(config.get("model_type", "unknown"))
        gemma = model_type.startswith("gemma")
        return cls(
            model_type=model_type,
            hidden=hidden,
            layers=layers,
            heads=heads,
            kv_heads=get("num_key_value_heads", "n_head_kv", default=heads),
            head_dim=get("head_dim", default=hidden // heads),
            intermediate=get("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
            vocab=vocab,
            tied=bool(config.get("tie_word_embeddings", gemma)),
            gated=GATED_MLP.get(model_type, True),
            experts=get("num_local_experts", "num_experts", default=1),
            active_experts=get("num_experts_per_tok", default=1),
            norms_per_layer=4 if model_type in ("gemma2", "gemma3", "gemma3_text") else 2,
            qk_norm=model_type in ("gemma3", "gemma3_text", "qwen3", "qwen3_moe"),
            qkv_bias=bool(config.get("attention_bias")) or model_type == "qwen2",
            stored_bytes=DTYPE_BYTES.get(str(get("dtype", "torch_dtype", default="bfloat16")), 2),
        )

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int, int]]:
        """Each Linear of one decoder layer: name -> (in_features, out_features, copies) (copies: MoE experts)."""
        h, i, e = self.hidden, self.intermediate, self.experts
        out = {"q_proj": (h, self.q_dim, 1), "k_proj": (h, self.kv_dim, 1), "v_proj": (h, self.kv_dim, 1),
               "o_proj": (self.q_dim, h, 1), "up_proj": (h, i, e), "down_proj": (i, h, e)}  # fmt: skip
        if self.gated:
            out["gate_proj"] = (h, i, e)
        return out

    def layer_linear_params(self) -> int:
        return sum(a * b * c for a, b, c in self.linears().values())

    def params(self) -> dict[str, int]:
        """Parameter counts: ``linear`` (the decoder's Linear weights, what 4-bit quantizes), ``other`` (embeddings,
        norms, biases, an untied LM head), ``lm_head`` (the head's matrix, tied or not), ``total``."""
        h = self.hidden
        per_layer_other = self.norms_per_layer * h + (2 * self.head_dim if self.qk_norm else 0)
        per_layer_other += (self.q_dim + 2 * self.kv_dim) if self.qkv_bias else 0
        linear = self.layers * self.layer_linear_params()
        embed = self.vocab * h
        other = embed + self.layers * per_layer_other + h + (0 if self.tied else embed)
        return {"linear": linear, "other": other, "lm_head": embed, "total": linear + other}


# ------------------------------------------------------------------ what the recipe asks
@dataclass
class Setup:
    """One rank's training step, as the planner sees it. ``device``: 'cpu' or a :data:`GPUS` name (or 'cuda' for
    the GPU this process sees); ``memory``: the device's bytes (None: unknown)."""

    stage: str = "sft"
    batch: int = 1  # rows per device per step (before preference stages double them)
    seq: int = 1024  # tokens per row
    checkpointing: bool = False
    load_in_4bit: bool = False
    double_quant: bool = True
    weights_dtype: str = "float32"  # of full-precision weights ('auto' resolved)
    use_peft: bool = True
    lora_r: int = 16
    lora_targets: Any = "all-linear"
    lora_dropout: float = 0.05
    optim: str = "adamw_torch"
    num_processes: int = 1
    zero_stage: int | None = None
    offload_optimizer: bool = False
    offload_params: bool = False
    device: str = "cpu"
    memory: int | None = None
    peak_tflops: float | None = None
    attn: str = "sdpa"
    grad_accum: int = 1
    head: str = "causal_lm"  # a task head (seq_cls, token_cls, ...) has no vocabulary-wide logits
    notes: list[str] = field(default_factory=list)

    @property
    def gpu(self) -> bool:
        return self.device != "cpu"

    @property
    def compute_bytes(self) -> int:
        """Bytes of one activation element: the compute dtype (bf16 on GPU with 'auto'; fp32 on CPU)."""
        return 2 if self.gpu and self.weights_dtype != "float32" else 4


@dataclass
class Plan:
    """The estimate: ``rows`` (name, bytes, note) summing to ``total`` bytes per rank; ``capacity`` the device's
    bytes (None: unknown); ``tokens_per_s`` per rank; ``advice``: changes that would fit, each with its total."""

    setup: Setup
    arch: Arch
    rows: list[tuple[str, int, str]]
    total: int
    capacity: int | None
    tokens_per_s: float | None
    flops_per_token: float
    advice: list[str] = field(default_factory=list)
    source: str = ""
    load: int = 0  # CPU: the peak while the weights load (bytes), when above the training step's (then ``total``)

    @property
    def fits(self) -> bool | None:
        return None if self.capacity is None else self.total <= self.capacity

    @property
    def clearly_too_big(self) -> bool:
        """The estimate exceeds the device even at its lower bound (-15%): what a run refuses."""
        return self.capacity is not None and self.total > self.capacity * REFUSE_MARGIN

    def record(self) -> dict[str, Any]:
        """The plan as ``alignkit_run.json`` keeps it (MiB)."""
        return {
            "device": self.setup.device,
            "predicted_peak_mib": round(self.total / MiB),
            "capacity_mib": None if self.capacity is None else round(self.capacity / MiB),
            "fits": self.fits,
            "parts_mib": {name: round(b / MiB) for name, b, _ in self.rows},
            "tokens_per_s": None if self.tokens_per_s is None else round(self.tokens_per_s, 1),
        }


def _trainable_lora(arch: Arch, setup: Setup) -> int:
    """LoRA parameters: r x (in + out) per targeted Linear of every layer (``all-linear``: all of them; a regular
    expression: all of them, counted as an upper bound)."""
    names = _targets(setup.lora_targets)
    per_layer = sum(setup.lora_r * (a + b) * c for n, (a, b, c) in arch.linears().items() if n in names)
    return arch.layers * per_layer


def _targets(targets) -> set[str]:
    if targets in (None, "all-linear") or isinstance(targets, str):
        return set(LINEAR_NAMES)
    names: set[str] = set()
    for t in targets:
        names.update(LINEAR_ALIASES.get(t, (t,)))
    return names & set(LINEAR_NAMES)


def activation_elements(arch: Arch, setup: Setup) -> tuple[float, float]:
    """Per token and layer, what the backward pass keeps: (elements in the compute dtype, bytes of dropout masks)."""
    h, q, kv, i = arch.hidden, arch.q_dim, arch.kv_dim, arch.intermediate
    attn = 2 * h + (q + 2 * kv) + q + q  # norm in/out, q/k/v after RoPE, SDPA out, o_proj's (contiguous) input
    if arch.qk_norm:
        attn += q + kv
    mlp = 2 * h + (4 * i if arch.gated else 2 * i) * max(1, arch.active_experts)
    extra_norms = (arch.norms_per_layer - 2) * h
    elements = attn + mlp + extra_norms
    if setup.compute_bytes == 2:  # RMSNorm upcasts its input: the copy it keeps is fp32 (two 16-bit elements)
        elements += arch.norms_per_layer * h
    masks = 0.0
    if setup.use_peft and setup.lora_dropout > 0 and setup.stage not in REFERENCE_STAGES | {"orpo", "simpo"}:
        # trl's preference trainers disable dropout (disable_dropout: true); elsewhere peft drops each input apart
        names = _targets(setup.lora_targets)
        dropped = sum(a for n, (a, _, _) in arch.linears().items() if n in names)
        elements += dropped
        masks += dropped
    return elements, masks


def estimate(arch: Arch, setup: Setup, source: str = "") -> Plan:
    """The memory plan of ``setup`` on ``arch`` (bytes per rank), see the module docstring."""
    p = arch.params()
    gpu, n = setup.gpu, max(1, setup.num_processes)
    zero = setup.zero_stage if n > 1 or setup.zero_stage else None
    rows: list[tuple[str, int, str]] = []
    act_bytes = setup.compute_bytes
    # --- weights
    if setup.load_in_4bit:
        per = 0.5 + (1 / 64 + 4 / (64 * 256) if setup.double_quant else 4 / 64)
        weights = int(p["linear"] * per + p["other"] * 4)
        note = f"{p['linear'] / 1e9:.2f}B nf4 ({per:.3f} B each) + {p['other'] / 1e9:.2f}B fp32 (embeddings, norms)"
    else:
        wb = DTYPE_BYTES[setup.weights_dtype]
        weights = p["total"] * wb
        note = f"{p['total'] / 1e9:.2f}B x {wb} B ({setup.weights_dtype})"
    if zero == 3:
        gathered = arch.layer_linear_params() * (0.5 if setup.load_in_4bit else DTYPE_BYTES[setup.weights_dtype])
        weights = 0 if setup.offload_params else weights // n
        weights += int(2 * gathered)  # a layer gathered, the next prefetched
        note += f"; ZeRO-3 over {n} ranks{' (offloaded to CPU)' if setup.offload_params else ''} + 2 layers gathered"
    rows.append(("weights", weights, note))
    # --- what trains
    if setup.use_peft:
        trainable = _trainable_lora(arch, setup)
        # trl casts a quantized model's adapter to bf16 (alignkit's adapter_dtype row puts it back in the compute
        # dtype where bf16 is slow, i.e. fp32 on CPU); peft keeps a 16-bit model's adapter in fp32
        train_bytes = 2 if setup.load_in_4bit and setup.compute_bytes == 2 else 4
        kind = "bf16" if train_bytes == 2 else "fp32"
        split = n if zero == 3 else 1
        note = f"{trainable / 1e6:.1f}M params, r={setup.lora_r}, {kind}" + (f", / {n} ranks" if split > 1 else "")
        rows.append(("LoRA adapter", trainable * train_bytes // split, note))
        if setup.stage in REFERENCE_STAGES:
            rows.append(("reference adapter", trainable * train_bytes // split, "trl's frozen 'ref' copy of it"))
    else:
        trainable = p["total"]
        train_bytes = DTYPE_BYTES[setup.weights_dtype]
    grads = trainable * train_bytes
    if zero in (2, 3):
        grads //= n
    rows.append(("gradients", grads, f"{trainable / 1e6:.1f}M trained" + (f", / {n} ranks (ZeRO)" if zero else "")))
    optim = setup.optim.lower()
    # torch's AdamW keeps its two moments in the parameter's dtype; DeepSpeed keeps fp32 moments and an fp32 master
    # copy of 16-bit trained weights
    per_param = 2 * train_bytes
    if zero is not None:
        per_param = 8 + (4 if train_bytes < 4 else 0)
    if "8bit" in optim:
        per_param = 2
    elif optim.startswith("sgd"):
        per_param = 0
    elif "adafactor" in optim:
        per_param = 1
    opt = trainable * per_param
    opt_note = f"{per_param} B per trained param ({setup.optim})"
    if zero is not None:
        opt //= n
        opt_note += f", / {n} ranks"
    if setup.offload_optimizer:
        opt, opt_note = 0, opt_note + ", offloaded to CPU"
    rows.append(("optimizer state", opt, opt_note))
    # --- activations
    seqs = setup.batch * PREFERENCE_STAGES.get(setup.stage, 1)
    tokens = seqs * setup.seq
    elements, masks = activation_elements(arch, setup)
    per_layer = tokens * (elements * act_bytes + masks)
    if setup.attn == "eager":
        per_layer += seqs * arch.heads * setup.seq**2 * act_bytes * 2  # weights and their softmax
    if setup.checkpointing:
        kept = arch.layers * tokens * arch.hidden * act_bytes + per_layer
        act_note = f"checkpointing: {arch.layers} layer inputs + 1 layer recomputed; {tokens} tokens"
    else:
        kept = arch.layers * per_layer
        act_note = f"{arch.layers} layers x {tokens} tokens x {elements * act_bytes + masks:.0f} B"
    rows.append(("activations", int(kept), act_note))
    # the backward pass's own temporaries: one layer's gradients in flight
    work = tokens * (2 * arch.hidden + 2 * arch.intermediate * max(1, arch.active_experts)) * act_bytes
    rows.append(("backward workspace", int(work), "one layer's activation gradients"))
    # --- logits (trl's fused LM head: never the whole tokens x vocab)
    if setup.head != "causal_lm":
        head, head_note = tokens * arch.hidden * act_bytes, f"{setup.head} head: no vocabulary-wide logits"
    elif gpu:
        head = tokens * min(arch.vocab, 32768) * 4 + tokens * arch.hidden * act_bytes
        head_note = "trl's fused LM head (Triton): one vocabulary tile in fp32"
    else:
        # alignkit's cpu_lm_head: the forward's fp32 probabilities kept for backward while they fit 1 GiB, and one
        # chunk's logits and probabilities (lm_head.py)
        chunk = max(1, min(1024, (256 * MiB) // (4 * arch.vocab)))
        kept = tokens * arch.vocab * 4
        head = (kept if kept <= GiB else 0) + 2 * min(tokens, chunk) * arch.vocab * 4
        head_note = "alignkit's cpu_lm_head: chunk logits" + (" + fp32 probabilities kept" if kept <= GiB else "")
    rows.append(("logits", int(head), head_note))
    if not gpu:
        # alignkit's allocator setting (no trimming, no mmap: speedups/cpu.py) keeps freed temporaries in the heap
        kept_heap = CPU_HEAP_TOKEN_ROWS * tokens * arch.layers * (arch.hidden + arch.intermediate) * 4
        rows.append(("heap retention (CPU)", int(kept_heap), f"{CPU_HEAP_TOKEN_ROWS} rows/token/layer (measured)"))
    if not gpu and setup.load_in_4bit:
        # bitsandbytes on CPU dequantizes each Linear's weight to fp32 for every matmul (forward, backward and a
        # recomputation); the heap keeps those temporaries: measured, one fp32 copy of the quantized weights plus
        # CPU_4BIT_TOKEN_ROWS (checkpointing: more) rows of hidden + intermediate per token and layer
        rows_per = CPU_4BIT_TOKEN_ROWS[setup.checkpointing]
        q4 = p["linear"] * 4 + rows_per * tokens * arch.layers * (arch.hidden + arch.intermediate) * 4
        rows.append(("4-bit dequantization (CPU)", int(q4), f"fp32 weights + {rows_per} rows/token/layer (measured)"))
    if setup.stage in REFERENCE_STAGES:
        rows.append(("reference pass", 0, "no gradients: one layer at a time, within the workspace above"))
    if zero is not None:
        buckets = 3 * arch.hidden**2 * 2  # reduce + prefetch buckets ('auto': hidden^2 elements)
        rows.append(("DeepSpeed buffers", buckets, "reduce and prefetch buckets"))
    elif n > 1:
        rows.append(("DDP buckets", trainable * train_bytes, "DDP's all-reduce buckets: a copy of the gradients"))
    # --- the process
    dynamic = sum(b for _, b, _ in rows)
    if gpu:
        rows.append(("CUDA context", CUDA_CONTEXT_BYTES, "context and library workspaces"))
        rows.append(("allocator reserve", int(dynamic * GPU_FRAGMENTATION), f"{GPU_FRAGMENTATION:.0%} fragmentation"))
    else:
        rows.append(("process (measured)", CPU_PROCESS_BYTES, "python + torch/trl imports, tiny-model run"))
        rows.append(("tokenizer", arch.vocab * CPU_TOKENIZER_BYTES_PER_ENTRY, f"{arch.vocab} entries"))
    total = sum(b for _, b, _ in rows)
    load = 0
    if not gpu:  # loading maps the checkpoint's file while it builds the weights: both count in the peak RSS
        process = CPU_PROCESS_BYTES + arch.vocab * CPU_TOKENIZER_BYTES_PER_ENTRY
        load = int(process + CPU_LOAD_FILE_SHARE * p["total"] * arch.stored_bytes + weights)
        if load > total:
            total = load
    flops = flops_per_token(arch, setup)
    rate = _rate(setup)
    tps = rate / flops if rate else None
    return Plan(setup, arch, rows, total, setup.memory, tps, flops, source=source, load=load if load == total else 0)


def flops_per_token(arch: Arch, setup: Setup) -> float:
    """Training FLOPs per token of one step (see the module docstring); preference stages count chosen and rejected
    tokens both, so the rate is in processed tokens."""
    matmul = arch.layers * (arch.layer_linear_params() // max(1, arch.experts) * max(1, arch.active_experts))
    matmul += arch.params()["lm_head"]
    forward = _trl_forward_flops(arch, setup.seq) or 2 * matmul + 4 * setup.seq * arch.q_dim * arch.layers
    passes = 3.0 if not setup.use_peft else 2.0  # forward, activation gradients, and weight gradients if all train
    if setup.checkpointing:
        passes += 1.0
    if setup.stage in REFERENCE_STAGES:
        passes += 1.0
    return forward * passes


def _trl_forward_flops(arch: Arch, seq: int) -> float | None:
    """Forward FLOPs per token by trl's ``compute_flops_per_token`` (its training figure / 3; a dense decoder)."""
    if arch.experts > 1:
        return None
    try:
        from types import SimpleNamespace

        from trl.trainer.utils import compute_flops_per_token
    except ImportError:
        return None
    config = SimpleNamespace(hidden_size=arch.hidden, num_hidden_layers=arch.layers, vocab_size=arch.vocab,
                             num_attention_heads=arch.heads, num_key_value_heads=arch.kv_heads,
                             head_dim=arch.head_dim, intermediate_size=arch.intermediate)  # fmt: skip
    return compute_flops_per_token(config, seq) / 3


def _rate(setup: Setup) -> float | None:
    """FLOP/s one rank sustains (assumed utilisation x peak)."""
    if setup.gpu:
        if not setup.peak_tflops:
            return None
        return setup.peak_tflops * 1e12 * (MFU["gpu_4bit"] if setup.load_in_4bit else MFU["gpu"])
    probe = runtime.gemm_probe()
    if not probe:
        return None
    return probe["float32_gflops"] * 1e9 * MFU["cpu"]


# ------------------------------------------------------------------ from a recipe
def gpu_spec(name: str) -> tuple[str, int, float]:
    """``--gpu`` value -> (name, memory bytes, dense bf16 TFLOP/s). Accepts :data:`GPUS` names (any case, with or
    without dashes) and a bare size such as '24GB' / '80G'. ConfigError listing the names otherwise."""
    key = name.strip().upper().replace("_", "-")
    for known, (mem, tflops) in GPUS.items():
        if key in (known.upper(), known.upper().replace("-", "")):
            return known, int(mem * GiB), peak_tflops(known) or tflops
    size = re.fullmatch(r"(\d+)\s*GI?B?", key)
    if size:
        gib = int(size.group(1))
        typical = GENERIC_GPUS.get(gib)
        return f"{gib}GB GPU", gib * GiB, GPUS[typical][1] if typical else GPUS["A100-80GB"][1]
    raise ConfigError(f"--gpu {name}: unknown. Fix: one of {sorted(GPUS)}, or a size such as 24GB.")


def peak_tflops(device: str) -> float | None:
    """Dense bf16 TFLOP/s of ``device`` from trl's table (``trl.trainer.utils.get_peak_flops``, TorchTitan's
    values), None when trl does not list it (:data:`GPUS` has a fallback)."""
    try:
        from trl.trainer.utils import get_peak_flops
    except ImportError:
        return None
    flops = get_peak_flops(device.replace("-", " "), "bfloat16")
    return flops / 1e12 if flops else None


ZERO_CONFIGS = {"ddp": (None, False, False), "zero2": (2, False, False), "zero3": (3, False, False),
                "zero3_offload": (3, True, True), "multinode_zero3": (3, False, False)}  # fmt: skip


def setup_from_recipe(recipe, stage: str, gpu: str | None = None, num_processes: int | None = None,
                      accelerate_config: str | None = None, head: str = "causal_lm") -> Setup:  # fmt: skip
    """The :class:`Setup` of a parsed recipe (``alignkit.config.Recipe``) for ``stage``. ``gpu``: plan for that GPU
    (:func:`gpu_spec`) instead of this machine; ``num_processes`` and ``accelerate_config`` (a shipped name: ddp,
    zero2, zero3, zero3_offload): the launch to plan for, else this process's own launch."""
    t, q, a, m = recipe.train, recipe.quant, recipe.adapter, recipe.model
    notes: list[str] = []
    if gpu:
        device, memory, tflops = gpu_spec(gpu)
    elif runtime.gpu_available():
        import torch

        device, memory, tflops = torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory, None
        tflops = peak_tflops(device) or GPUS.get(next((k for k in GPUS if k in device.upper()), ""), (0, None))[1]
    else:
        device, memory, tflops = "cpu", runtime.memory_facts()["total"], None
    on_gpu = device != "cpu"
    explicit = recipe.explicit
    if "activation_checkpointing" in explicit or "gradient_checkpointing" in explicit:
        ckpt = bool(getattr(t, "activation_checkpointing", None) or getattr(t, "gradient_checkpointing", None))
    else:
        ckpt = on_gpu  # alignkit's device default (alignkit.config.trainers)
    dtype = m.dtype if m.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
    if not on_gpu and dtype != "float32":
        dtype = dtype  # a CPU run asked for 16-bit weights: as asked
    seq = getattr(t, "block_size", None) if stage == "cpt" else None
    seq = seq or getattr(t, "max_length", None) or getattr(t, "max_seq_length", None) or 1024
    if stage in ("distill", "online_dpo"):
        notes.append(f"{stage}: the teacher / judge model and generation are not counted")
    if stage in ("grpo", "rloo"):
        seq = (getattr(t, "max_prompt_length", None) or 512) + (getattr(t, "max_completion_length", None) or 256)
        notes.append("GRPO/RLOO: prompt + completion length, generation not counted")
    if not on_gpu and getattr(t, "bf16", False):
        notes.append("CPU bf16 autocast: planned as fp32 activations (an upper bound; measured rows are fp32)")
    n = num_processes or runtime.world_size()
    zero, off_opt, off_params = ZERO_CONFIGS.get(accelerate_config or "", (None, False, False))
    if accelerate_config is None:
        zero = runtime.zero_stage(t)
    elif accelerate_config not in ZERO_CONFIGS:
        zero, off_opt, off_params = _launch_config(accelerate_config)
    return Setup(
        stage=stage,
        batch=int(getattr(t, "per_device_train_batch_size", 1) or 1),
        seq=int(seq),
        checkpointing=ckpt,
        load_in_4bit=bool(q.load_in_4bit),
        double_quant=bool(q.bnb_4bit_use_double_quant),
        weights_dtype=dtype,
        use_peft=bool(a.use_peft),
        lora_r=int(a.lora_r),
        lora_targets=a.lora_target_modules,
        lora_dropout=float(a.lora_dropout or 0),
        optim=str(getattr(getattr(t, "optim", None), "value", getattr(t, "optim", "adamw_torch"))),
        num_processes=max(1, int(n)),
        zero_stage=zero,
        offload_optimizer=off_opt,
        offload_params=off_params,
        device=device,
        memory=memory,
        peak_tflops=tflops,
        attn=m.attn_implementation or "sdpa",
        grad_accum=int(getattr(t, "gradient_accumulation_steps", 1) or 1),
        head=head,
        notes=notes,
    )


def _launch_config(path: str) -> tuple[int | None, bool, bool]:
    """(ZeRO stage, optimizer offloaded, parameters offloaded) of an accelerate config file; ConfigError naming the
    shipped names when ``path`` is neither."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--accelerate_config {path}: neither a file nor one of {sorted(ZERO_CONFIGS)}.")
    settings = yaml.safe_load(file.read_text()) or {}
    if settings.get("distributed_type") != "DEEPSPEED":
        return None, False, False
    ds = settings.get("deepspeed_config") or {}
    zero = ds.get("zero_stage")
    off_opt = ds.get("offload_optimizer_device") not in (None, "none")
    off_params = ds.get("offload_param_device") not in (None, "none")
    if ds.get("deepspeed_config_file"):
        json_file = Path(ds["deepspeed_config_file"])
        json_file = json_file if json_file.is_absolute() or json_file.is_file() else file.parent / json_file
        if json_file.is_file():
            zero_opt = json.loads(json_file.read_text()).get("zero_optimization", {})
            zero = zero_opt.get("stage", zero)
            off_opt = off_opt or zero_opt.get("offload_optimizer", {}).get("device", "none") != "none"
            off_params = off_params or zero_opt.get("offload_param", {}).get("device", "none") != "none"
    return (int(zero) if zero is not None else 2), off_opt, off_params


def read_model_config(model_args, model_config: str | None = None) -> tuple[dict[str, Any], str]:
    """The model's ``config.json`` as a dict and where it came from, without loading weights: ``model_config`` (a
    file or a folder) if given; else the model's own folder (a local model, a tiny/packaged model, an earlier stage's
    output's base); else the Hub cache; else the configs shipped with alignkit (:data:`CONFIG_DIR`). ConfigError
    saying what to pass when none has it."""
    if model_config:
        path = Path(model_config)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise ConfigError(
                f"--model_config {model_config}: no such file. Fix: the model's config.json or its folder."
            )
        return json.loads(path.read_text()), str(path)
    name = model_args.model_name_or_path or ""
    from alignkit.models import packaged
    from alignkit.models.sources import is_hub_id, resolve_source

    if (
        packaged.is_packaged(name)
        and name in packaged.PACKAGED_MODELS
        and packaged.PACKAGED_MODELS[name].kind == "gguf"
    ):
        folder = packaged.converted_dir(name)
        if not (folder / "config.json").is_file():
            raise ConfigError(
                f"model_name_or_path: {name} is not fetched yet, and the planner reads its config.json. Fix: `alignkit "
                f"fetch {name}` (once), or --model_config path/config.json."
            )
        return json.loads((folder / "config.json").read_text()), f"{name} (cache)"
    shipped = CONFIG_DIR / (name.replace("/", "--") + ".json")
    if is_hub_id(name):
        cached = _hub_cached_config(name, model_args.revision)
        if cached:
            return json.loads(Path(cached).read_text()), f"{name} (Hub cache)"
        if shipped.is_file():
            return json.loads(shipped.read_text()), f"{name} (shipped with alignkit: {shipped.name})"
        raise ConfigError(
            f"model_name_or_path: {name} is a Hub id that is not in the local cache, and the planner needs its "
            "config.json (no weights). Fix: download the model (or just its config.json) into a folder and point "
            "model_name_or_path at it, or pass --model_config path/config.json."
        )
    if not Path(name).exists() and ":" not in name and shipped.is_file():
        return json.loads(shipped.read_text()), f"{name} (shipped with alignkit)"
    try:
        source = resolve_source(model_args)
    except ConfigError as exc:  # not there (yet): the planner can still work from the model's config.json
        raise ConfigError(f"{exc} To plan without it: --model_config path/config.json (the base model's).") from None
    path = Path(source.base) / "config.json"
    if not path.is_file():
        state = (
            "has no config.json" if Path(source.base).exists() else "does not exist yet (an earlier stage's output?)"
        )
        raise ConfigError(
            f"model_name_or_path: {source.base} {state}, and the planner reads the model's config.json. Fix: run that "
            "stage first, point model_name_or_path at a model folder, or pass --model_config path/config.json."
        )
    return json.loads(path.read_text()), str(name)


def _hub_cached_config(name: str, revision: str = "main") -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json", revision=revision)
        return found if isinstance(found, str) else None
    except Exception:  # no cache, an odd revision: not cached
        return None


def plan_recipe(recipe, stage: str, gpu: str | None = None, num_processes: int | None = None,
                accelerate_config: str | None = None, model_config: str | None = None) -> Plan:  # fmt: skip
    """:func:`estimate` for a parsed recipe, with advice when it does not fit."""
    from alignkit.stages import STAGES

    config, where = read_model_config(recipe.model, model_config)
    arch = Arch.from_config(config)
    head = STAGES[stage].head or getattr(_task_group(recipe), "task", None) or "causal_lm"
    setup = setup_from_recipe(recipe, stage, gpu, num_processes, accelerate_config, head=head)
    plan = estimate(arch, setup, source=where)
    if plan.fits is False:
        plan.advice = advise(arch, setup)
    return plan


def _task_group(recipe):
    return next((g for g in recipe.extra if hasattr(g, "task")), None)


def advise(arch: Arch, setup: Setup) -> list[str]:
    """Changes that make ``setup`` fit, cheapest first, each with its estimate: checkpointing, a smaller batch with
    more accumulation (the same effective batch), 4-bit weights, shorter rows, ZeRO-3 over the ranks."""
    options: list[tuple[str, Setup]] = []
    if not setup.checkpointing:
        options.append(("activation_checkpointing: true", replace(setup, checkpointing=True)))
    s = setup
    while s.batch > 1:
        s = replace(s, batch=max(1, s.batch // 2), grad_accum=s.grad_accum * 2)
        options.append((f"per_device_train_batch_size: {s.batch}, gradient_accumulation_steps: {s.grad_accum}", s))
        if not setup.checkpointing:
            options.append((f"both: checkpointing, batch {s.batch} x accumulation {s.grad_accum}",
                            replace(s, checkpointing=True)))  # fmt: skip
    if not setup.load_in_4bit:
        options.append(("load_in_4bit: true (QLoRA)", replace(setup, load_in_4bit=True, use_peft=True)))
        options.append(("load_in_4bit: true and checkpointing",
                        replace(setup, load_in_4bit=True, use_peft=True, checkpointing=True)))  # fmt: skip
    length = setup.seq
    while length > 256:
        length //= 2
        options.append((f"max_length: {length}", replace(setup, seq=length, checkpointing=True)))
    if setup.gpu and setup.zero_stage != 3:
        for n in (2, 4, 8):
            options.append((f"ZeRO-3 over {n} GPUs (--accelerate_config zero3 --num_processes {n})",
                            replace(setup, zero_stage=3, num_processes=n, checkpointing=True)))  # fmt: skip
        options.append(("ZeRO-3 with CPU offload over 8 GPUs (zero3_offload)",
                        replace(setup, zero_stage=3, num_processes=8, offload_optimizer=True, offload_params=True,
                                checkpointing=True)))  # fmt: skip
    out = []
    for label, alt in options:
        total = estimate(arch, alt).total
        if alt.memory and total <= alt.memory:
            out.append(f"{label}: {total / GiB:.1f} GiB")
        if len(out) >= 4:
            break
    return out or ["nothing alignkit can change fits: a device with more memory, or a smaller model"]


def render(plan: Plan) -> str:
    """The plan as a table for the console (GiB), its verdict and, when it does not fit, what to change."""
    s, a = plan.setup, plan.arch
    p = a.params()
    rows_per = PREFERENCE_STAGES.get(s.stage, 1)
    lines = [
        f"memory plan ({s.stage}, per rank): {plan.source}: {a.model_type}, {p['total'] / 1e9:.2f}B params, "
        f"{a.layers} layers, hidden {a.hidden}, vocab {a.vocab}",
        f"  device {s.device}{f' ({s.memory / GiB:.1f} GiB)' if s.memory else ''}, {s.num_processes} rank(s)"
        f"{f', ZeRO-{s.zero_stage}' if s.zero_stage else ''}{', offload' if s.offload_optimizer else ''}; batch "
        f"{s.batch}{f' x {rows_per} (chosen + rejected)' if rows_per > 1 else ''} x {s.seq} tokens; "
        f"{'4-bit' if s.load_in_4bit else s.weights_dtype}; "
        f"{'LoRA r=' + str(s.lora_r) if s.use_peft else 'full fine-tuning'}; "
        f"checkpointing {'on' if s.checkpointing else 'off'}",
    ]
    width = max(len(r[0]) for r in plan.rows)
    for name, size, note in plan.rows:
        lines.append(f"  {name:<{width}}  {size / GiB:8.2f} GiB  {note}")
    if plan.load:
        lines.append(f"  {'(model load)':<{width}}  {plan.load / GiB:8.2f} GiB  the peak: the checkpoint's file mapped "
                     "while the weights are built, above the training step's sum")  # fmt: skip
    lines.append(f"  {'total':<{width}}  {plan.total / GiB:8.2f} GiB  (validated to +-15%: docs/planning.md)")
    if plan.tokens_per_s:
        lines.append(f"  throughput ~{plan.tokens_per_s:,.0f} tokens/s per rank ({plan.flops_per_token / 1e9:.2f} "
                     f"GFLOP/token, assumed utilisation; an estimate, not a promise)")  # fmt: skip
    if plan.fits is None:
        lines.append("  fits: unknown (no device memory given: --gpu NAME)")
    elif plan.fits:
        lines.append(f"  fits: yes ({plan.total / plan.capacity:.0%} of {plan.capacity / GiB:.1f} GiB)")
    else:
        lines.append(f"  fits: NO ({plan.total / GiB:.1f} GiB > {plan.capacity / GiB:.1f} GiB). What would fit:")
        lines += [f"    - {line}" for line in plan.advice]
    lines += [f"  note: {n}" for n in s.notes]
    return "\n".join(lines)


def preflight(recipe, stage: str) -> Plan | None:
    """Before anything loads: log the plan for this run on this device, and refuse (PreflightError, with what to
    change) when even its lower bound exceeds the device's memory (CPU: the machine's RAM, or the container's
    limit). A plan that exceeds the memory available right now is a warning only. None when the model's config
    cannot be read without loading (the run goes on; its own loader says what is wrong). ``ALIGNKIT_SKIP_MEMORY_CHECK=1``
    turns the refusal into a warning."""
    try:
        plan = plan_recipe(recipe, stage)
    except (AlignkitError, OSError, ValueError, KeyError, TypeError) as exc:  # the loader says what is wrong
        logger.info("memory plan: skipped (%s)", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
    if runtime.is_main_process():
        logger.info("%s", render(plan))
    if plan.clearly_too_big:
        message = (
            f"memory plan: this run needs ~{plan.total / GiB:.1f} GiB per rank on {plan.setup.device} and the device "
            f"has {plan.capacity / GiB:.1f} GiB, beyond the estimate's 15% margin. Fix: "
            + "; or ".join(plan.advice[:3])
            + f" (`alignkit plan --config <recipe>` shows the table; {SKIP_ENV}=1 runs anyway)."
        )
        if os.environ.get(SKIP_ENV) == "1":
            logger.warning("%s", message)
        else:
            raise PreflightError(message)
    elif not plan.setup.gpu:
        available = runtime.memory_facts()["available"]
        if available and plan.total > available:
            logger.warning("memory plan: ~%.1f GiB needed, %.1f GiB available now", plan.total / GiB, available / GiB)
    return plan
