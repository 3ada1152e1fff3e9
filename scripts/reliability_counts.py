"""Count the reliability cases per entry point at one or more git revisions (issue 43's closing note: before/after).

    python scripts/reliability_counts.py [REV ...]        (default: before issue 43, and HEAD)

A case is one collected test item (each parametrization counts) of tests/reliability/ and of the export kill test in
tests/export/test_gguf.py; its entry point is read from its test id (a table case is named after its command), and
items that train go to the stage's entry. Each revision is checked out into a temporary git worktree and collected
with ``pytest --collect-only`` (nothing runs).
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEFORE = "35eaba7^"  # the parent of issue 43's first commit (outputs.py)
# (pattern in the test id, entry point): the first that matches wins
RULES = [
    (r"launch|two_rank", "accelerate launch"),
    (r"recipes/embed|embed-mnrl", "python recipes/embed.py"),
    (r"preview", "alignkit data preview"),
    (r"gguf|export", "alignkit export"),
    (r"merge", "alignkit merge"),
    (r"\bchat|chat-", "alignkit chat"),
    (r"generate", "alignkit generate"),
    (r"eval", "alignkit eval"),
    (r"report", "alignkit report"),
    (r"reward|grpo", "alignkit grpo / recipes/grpo.py"),
    (r"kto", "alignkit kto / recipes/kto.py"),
]
DEFAULT = "alignkit <stage> / python recipes/<stage>.py"


def collect(rev: str) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), rev], cwd=REPO, check=True)
        try:
            paths = ["tests/reliability"]
            if (tree / "tests/export/test_gguf.py").read_text().count("sigkill"):
                paths.append(
                    "tests/export/test_gguf.py::test_sigkill_during_export_keeps_the_old_gguf_and_the_models_own_files_are_never_the_out"
                )
            env = {**os.environ, "PYTHONPATH": str(tree)}
            done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                   *paths], cwd=tree, env=env, capture_output=True, text=True)  # fmt: skip
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=True)
    return [line for line in done.stdout.splitlines() if "::" in line]


def entry(test_id: str) -> str:
    path, name = test_id.split("::", 1)
    if path.endswith("test_malformed_inputs.py"):  # recipe/config/data cases: a stage run, or the launched sample
        return "accelerate launch" if "accelerate_launch" in name else DEFAULT
    if path.endswith("test_reliability_table.py") and "[" in name:  # a table case is named after its command
        head = name.split("[", 1)[1].split("-", 1)[0]
        table = {"merge": "alignkit merge", "export": "alignkit export", "chat": "alignkit chat", "eval": "alignkit eval",
                 "generate": "alignkit generate", "report": "alignkit report", "kto": "alignkit kto / recipes/kto.py",
                 "embed": "python recipes/embed.py"}  # fmt: skip
        return table.get(head, DEFAULT)
    for pattern, point in RULES:
        if re.search(pattern, name):
            return point
    return DEFAULT


def main(argv: list[str]) -> None:
    revs = argv or [BEFORE, "HEAD"]
    counts = {rev: collections.Counter(entry(t) for t in collect(rev)) for rev in revs}
    points = sorted({p for c in counts.values() for p in c}, key=lambda p: -max(c[p] for c in counts.values()))
    width = max(len(p) for p in points)
    print(f"{'entry point':<{width}} " + " ".join(f"{rev:>12}" for rev in revs))
    for point in points:
        print(f"{point:<{width}} " + " ".join(f"{counts[rev][point]:>12}" for rev in revs))
    print(f"{'all':<{width}} " + " ".join(f"{sum(counts[rev].values()):>12}" for rev in revs))


if __name__ == "__main__":
    main(sys.argv[1:])
