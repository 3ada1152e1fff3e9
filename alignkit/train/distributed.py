"""Multi-process runs launched with ``accelerate launch --config_file accelerate_configs/<x>.yaml``.

Here: an opt-in debug log that lets tests (and users chasing a sharding problem) see what each rank really trained on
and held, and the clean shutdown of the process groups at exit. The launch facts themselves (world size, ZeRO stage,
sharding, the CPU backend) are in alignkit.runtime.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from transformers import TrainerCallback

# Set to 1 to have every rank write distributed_debug_rank<r>.json (rows it trained on, ZeRO-3 shard sizes) and rank 0
# write distributed_debug_logits.safetensors (outputs of the gathered model on PROBE_IDS) to the output dir.
DEBUG_ENV = "ALIGNKIT_DISTRIBUTED_DEBUG"
PROBE_IDS = list(range(4, 36))


def debug_callback(output_dir: Path) -> TrainerCallback | None:
    return DistributedDebugLog(output_dir) if os.environ.get(DEBUG_ENV) == "1" else None


def _row_hashes(input_ids: torch.Tensor, attention_mask=None, position_ids=None) -> list[str]:
    """One hash per training row: padding dropped, and a padding-free batch (one sequence whose position ids restart
    at every row) split back into its rows."""
    hashes = []
    for i, ids in enumerate(input_ids):
        keep = attention_mask[i].bool() if attention_mask is not None else torch.ones_like(ids, dtype=torch.bool)
        ids = ids[keep]
        starts = [0] if position_ids is None else (position_ids[i][keep] == 0).nonzero().flatten().tolist()
        starts = sorted({0, *starts})
        for start, end in zip(starts, [*starts[1:], len(ids)]):
            hashes.append(hashlib.sha1(json.dumps(ids[start:end].tolist()).encode()).hexdigest()[:16])
    return hashes


class DistributedDebugLog(TrainerCallback):
    """Record, per rank, a hash of every training row the model saw and (under ZeRO-3) how much of each parameter
    this rank holds; at the end, rank 0 saves the gathered model's outputs on a fixed probe.

    Off unless ``ALIGNKIT_DISTRIBUTED_DEBUG=1``: it adds a forward pre-hook and a ``.tolist()`` per row.
    """

    def __init__(self, output_dir: Path):
        self.output_dir = Path(output_dir)
        self.rows: list[str] = []
        self.shards: dict[str, int] = {}
        self.handle = None

    def _record_rows(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if module.training and input_ids is not None:
            self.rows += _row_hashes(input_ids, kwargs.get("attention_mask"), kwargs.get("position_ids"))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.handle = model.register_forward_pre_hook(self._record_rows, with_kwargs=True)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1:  # after a full step ZeRO-3 has released every non-persistent parameter
            self.shards = _shard_sizes(model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.handle.remove()
        rank = int(os.environ.get("RANK", "0"))
        record = {"rank": rank, "world_size": int(os.environ.get("WORLD_SIZE", "1")), "rows": self.rows, **self.shards}
        (self.output_dir / f"distributed_debug_rank{rank}.json").write_text(json.dumps(record))
        outputs = _probe_outputs(model)  # every rank runs it: under ZeRO-3 the forward gathers parameters collectively
        if rank == 0:
            from safetensors.torch import save_file

            save_file(outputs, str(self.output_dir / "distributed_debug_logits.safetensors"))


def _shard_sizes(model) -> dict[str, int]:
    """Elements of all parameters (ds_numel), of this rank's partitions (ds_tensor) and of parameters materialised in
    full on this rank right now (persistent ones stay so; see stage3_param_persistence_threshold)."""
    params = [p for p in model.parameters() if hasattr(p, "ds_numel")]
    if not params:
        return {}
    trainable = [p for p in params if p.requires_grad]
    packed_4bit = [p for p in params if type(p).__name__ == "Params4bit"]
    return {
        "zero3_numel": sum(p.ds_numel for p in params),
        "zero3_local_numel": sum(p.ds_tensor.numel() for p in params),
        "zero3_materialised_numel": sum(p.data.numel() for p in params),
        "zero3_trainable_numel": sum(p.ds_numel for p in trainable),
        "zero3_trainable_local_numel": sum(p.ds_tensor.numel() for p in trainable),
        "zero3_4bit_numel": sum(p.ds_numel for p in packed_4bit),
        "zero3_4bit_local_numel": sum(p.ds_tensor.numel() for p in packed_4bit),
    }


@torch.no_grad()
def _probe_outputs(model) -> dict[str, torch.Tensor]:
    """Every tensor the model's forward returns on PROBE_IDS (logits; start/end logits for QA)."""
    was_training = model.training
    model.eval()
    ids = torch.tensor([PROBE_IDS], device=next(model.parameters()).device)
    extra = {"decoder_input_ids": ids} if getattr(model.config, "is_encoder_decoder", False) else {}
    output = model(input_ids=ids, **extra)
    model.train(was_training)
    return {k: v.float().cpu().contiguous() for k, v in output.items() if torch.is_tensor(v)}


def end_process_group_at_exit() -> None:
    """Destroy torch.distributed's process groups before the interpreter shuts down (an atexit handler, set once).

    Without it a rank can abort at exit after a finished run ('terminate called without an active exception', exit
    -6, seen about once in 10 two-rank ZeRO-3 launches): a Gloo worker thread still holds an async all-gather's
    tensors (ZeRO-3 prefetches), and releasing them during interpreter finalization takes the GIL from a dying thread
    (pytorch/pytorch#190489, #179291). At exit the ranks meet at a barrier, so no collective is still in flight, and
    the groups' backends are shut down while Python is fully alive."""
    import atexit

    if getattr(end_process_group_at_exit, "registered", False):
        return
    end_process_group_at_exit.registered = True
    atexit.register(_end_process_group)


def _end_process_group() -> None:
    import gc

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        dist.barrier()
    except Exception:  # noqa: BLE001 - another rank already gone: still shut down ours
        pass
    gc.collect()  # drop the Python side's last handles on finished work first
    dist.destroy_process_group()
