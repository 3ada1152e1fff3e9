"""The output folder a run writes into: one run at a time (:class:`alignkit.export.outputs.OutputDirLock`), never a finished run replaced or
unfinished checkpoints started over unasked, and in a launch of several processes the same folder on every rank.
Each failure is one PreflightError naming the path and the fix."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from alignkit.errors import PreflightError
from alignkit.export.outputs import OutputDirLock  # noqa: F401 (the run lock; merge and export share its module)
from alignkit.runs import RunRecord
from alignkit.train.callbacks import SUPERSEDED_DIR, checkpoints, superseded
from alignkit.train.resume import wants_resume

logger = logging.getLogger(__name__)


def check_output_dir(output_dir: Path, run_args, resume) -> None:
    """Never replace a finished run or start over unfinished checkpoints unasked; the dir must take writes."""
    out = Path(output_dir)
    asked = run_args.overwrite_output_dir or wants_resume(resume) or run_args.label_preview
    previous = RunRecord.read(out) if not asked else None
    if previous is not None and previous.finished:
        raise PreflightError(
            f"{out}: holds a finished {previous.stage} run. Fix: choose another output_dir, or set "
            "overwrite_output_dir: true to replace it."
        )
    if checkpoints(out) and not asked:
        raise PreflightError(
            f"{out}: holds checkpoints of an unfinished run. Fix: set resume_from_checkpoint: true to continue it, "
            "or overwrite_output_dir: true to start over."
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".alignkit_write_probe.{os.getpid()}"  # one per rank: ranks probe the same dir at once
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise PreflightError(
            f"output_dir {out}: not writable ({exc.strerror}). Fix: choose a writable output_dir."
        ) from exc
    free_gb = shutil.disk_usage(out).free / 2**30
    if free_gb < run_args.min_free_disk_gb:
        raise PreflightError(
            f"output_dir {out}: only {free_gb:.1f} GiB free, below min_free_disk_gb={run_args.min_free_disk_gb}. "
            "Fix: free disk space or choose another output_dir."
        )


def inputs_of(recipe, source) -> list[tuple[str, str]]:
    """(key, local path) of everything a run reads from disk: the model (and the adapter output it hands off from,
    with the adapters folded under it), the tokenizer, chat template, teacher and reward models (``reward_model_path``,
    ``reward_funcs`` folders), and each dataset (a glob: the folder above its first wildcard). Names that are not local paths (Hub ids, tiny:...) are left out."""
    m, t = recipe.model, recipe.train
    found = [("model_name_or_path", m.model_name_or_path), ("model_name_or_path (its base)", source.base),
             ("model_name_or_path (its adapter)", source.adapter_dir),
             *(("model_name_or_path (an adapter under it)", a) for a in source.fold_adapters),
             ("tokenizer_name_or_path", m.tokenizer_name_or_path),
             ("chat_template_path", getattr(t, "chat_template_path", None)),
             ("teacher_model_name_or_path", getattr(t, "teacher_model_name_or_path", None)),
             ("reward_model_path", getattr(t, "reward_model_path", None))]  # fmt: skip
    for group in recipe.extra:  # the reward models of GRPO/RLOO/online DPO: reward stage output folders
        funcs = getattr(group, "reward_funcs", None) or []
        found += [(f"reward_funcs[{i}]", f) for i, f in enumerate(funcs) if isinstance(f, str) and Path(f).is_dir()]
    for i, ds in enumerate(getattr(recipe.data, "datasets", None) or []):
        path = str(getattr(ds, "path", ds) or "")
        parts = Path(path).parts
        if any(c in path for c in "*?["):  # a glob of shards: its fixed part
            parts = parts[: next(n for n, part in enumerate(parts) if any(c in part for c in "*?["))]
        found.append((f"datasets[{i}].path", str(Path(*parts)) if parts else None))
    return [(key, str(path)) for key, path in found if isinstance(path, str) and path and Path(path).exists()]


def check_output_not_input(output_dir: Path, recipe, source) -> None:
    """Refuse an ``output_dir`` that is, holds or lies inside something the run reads (:func:`inputs_of`): the
    run would write over its own model, adapter or data (overwrite_output_dir would replace the adapter a run starts
    from). PreflightError naming both keys and the fix, before any model loads."""
    out = Path(output_dir).resolve()
    for key, path in inputs_of(recipe, source):
        where = Path(path).resolve()
        if out == where:
            how = "is"
        elif where.is_relative_to(out):
            how = "holds"
        elif out.is_relative_to(where):
            how = "lies inside"
        else:
            continue
        raise PreflightError(
            f"output_dir {output_dir}: {how} {key} ({path}), which this run reads; its outputs and checkpoints would "
            f"be written over what it loads. Fix: choose an output_dir outside {path} (e.g. {_sibling(output_dir)})."
        )


def _sibling(output_dir: Path) -> str:
    out = Path(output_dir)
    return str(out.with_name(f"{out.name}-next")) if out.name else "outputs/next"


def drop_replaced_checkpoints(output_dir: Path) -> None:
    """After an overwriting run finished: delete the checkpoints of the runs it replaced (moved aside into
    ``SUPERSEDED_DIR`` when it started): overwrite_output_dir asked for it, and the new run is complete."""
    folder = Path(output_dir) / SUPERSEDED_DIR
    old = superseded(output_dir)
    if folder.is_dir():
        shutil.rmtree(folder, ignore_errors=True)
        logger.info("overwrite_output_dir: deleted the replaced run's %s (%s)", SUPERSEDED_DIR,
                    ", ".join(p.name for p in old) or "empty")  # fmt: skip


RUN_ID_FILE = ".alignkit_run_id"


def check_shared_output_dir(output_dir: Path) -> None:
    """In a launch of several processes: every rank sees the same ``output_dir``. Rank 0 writes a fresh run id
    there, every rank reads it back, and all ranks compare notes (a gloo/nccl all-gather); on another node a path
    that is a local disk instead of the shared one shows no file or another run's id. Each node would otherwise save
    its own share of every checkpoint, and no node could resume. Raises the same PreflightError on every rank (so
    none waits for the others at the next collective). Needs the process group, so it runs once the trainer is
    built, before the first step."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    import socket
    import uuid

    path, rank, host = Path(output_dir) / RUN_ID_FILE, dist.get_rank(), socket.gethostname()
    run_id = [f"{uuid.uuid4().hex} {host}" if rank == 0 else None]
    if rank == 0:
        path.write_text(run_id[0])
    dist.broadcast_object_list(run_id, src=0)
    try:
        seen = path.read_text().strip()
    except OSError:
        seen = None
    problem = None
    if seen != run_id[0]:
        problem = f"rank {rank} on {host} finds {'no such file' if seen is None else f'another id ({seen})'}"
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    if rank == 0:
        path.unlink(missing_ok=True)  # everyone has read it
    bad = [p for p in problems if p]
    if bad:
        raise PreflightError(
            f"output_dir {output_dir}: not the same folder on every node: rank 0 wrote run id {run_id[0]!r} to "
            f"{path}, and {'; '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}. Checkpoints would be split across "
            "the nodes' disks and could not be resumed. Fix: put output_dir on storage every node mounts at the "
            "same path (NFS, Lustre, GPFS, ...) and pass that path."
        )
    if rank == 0:
        logger.info("output_dir %s: the same folder on all %d ranks (run id checked)", output_dir, len(problems))
