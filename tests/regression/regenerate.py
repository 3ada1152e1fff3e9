"""Regenerate golden.json: ``python -m tests.regression.regenerate [RUN ...]`` (all runs if none are named).

Then review ``git diff tests/regression/golden.json``: every changed line is one step of one metric.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

from tests.regression.golden import (  # noqa: E402
    RUNS,
    RUNS_BY_NAME,
    load_golden,
    machine_facts,
    mismatches,
    save_golden,
    trajectory,
)


def main(names: list[str]) -> None:
    unknown = [n for n in names if n not in RUNS_BY_NAME]
    if unknown:
        sys.exit(f"unknown run(s) {unknown}; known: {list(RUNS_BY_NAME)}")
    import torch

    torch.set_num_threads(1)  # as the tests run (tests/regression/conftest.py); results do not depend on it
    golden = load_golden()
    stored, stored_machine, here = golden["runs"], golden.get("machine"), machine_facts()
    runs = {name: entry for name, entry in stored.items() if name in RUNS_BY_NAME}  # drop runs that no longer exist
    with tempfile.TemporaryDirectory(prefix="alignkit-golden-") as tmp:
        for run in RUNS:
            if names and run.name not in names:
                continue
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
                now = trajectory(run, Path(tmp) / run.name)  # the trainers' logs; the summary below says what changed
            changes = mismatches(run.name, stored.get(run.name, {}).get("metrics", {}), now)
            print(f"{run.name}: " + ("unchanged" if not changes else "\n  ".join(["changed", *changes])))
            runs[run.name] = {"command": run.command, "metrics": now}
            if names and stored_machine and stored_machine != here:  # a partial regeneration on another machine
                runs[run.name]["machine"] = here
    save_golden(runs, machine=stored_machine if names and stored_machine else None)
    print("wrote tests/regression/golden.json; review it with: git diff tests/regression/golden.json")


if __name__ == "__main__":
    main(sys.argv[1:])
