"""The layer contract (pyproject.toml [tool.importlinter]) holds, and it is not blind: a deliberate upward import in
a copy of the package breaks it, naming the import."""

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _lint(root: Path) -> subprocess.CompletedProcess:
    env_path = f"{root}"  # the copy's packages first: lint-imports analyses what it imports
    return subprocess.run(
        [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"],
        cwd=root,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": env_path, "HOME": str(Path.home())},
        capture_output=True,
        text=True,
    )  # fmt: skip


def test_layer_contract_is_kept():
    done = _lint(REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "Contracts: 1 kept, 0 broken." in done.stdout


def test_layer_contract_fails_on_an_upward_import(tmp_path):
    for name in ("alignkit", "recipes"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "*.jsonl"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    args = tmp_path / "alignkit" / "config" / "args.py"
    args.write_text(args.read_text() + "\nfrom alignkit.train import runner  # noqa: E402  (deliberately upward)\n")
    done = _lint(tmp_path)
    assert done.returncode != 0, "the contract did not see an upward import"
    assert "alignkit.config is not allowed to import alignkit.train" in done.stdout, done.stdout[-3000:]
    assert "alignkit.config.args -> alignkit.train.runner" in done.stdout
