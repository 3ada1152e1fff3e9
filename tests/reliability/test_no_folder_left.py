"""A refused run, a preview, a failed write leaves the disk as it found it (docs/configuration.md: "leaves no folder
behind"): every folder the command made for its output, ``output_dir`` and each missing parent, is removed again;
never a folder that existed before, never one with anything in it. Real tiny runs through each entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, run_recipe

from alignkit.errors import DataError
from alignkit.export.outputs import make_folders, remove_folders, staged_output

SFT = ["--config", str(REPO / "recipes" / "tiny" / "sft.yaml"), "--disable_tqdm", "true"]


BEFORE = ["bad.jsonl", "good.jsonl", "kept"]


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def cwd(tmp_path, monkeypatch) -> Path:
    """A fresh working folder holding an empty ``kept/`` (there before the run: never removed), ``bad.jsonl`` (row 2
    ends on the user: the SFT schema refuses it once the run has taken its output_dir) and ``good.jsonl``."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "kept").mkdir()
    good = {"messages": [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]}
    bad = {"messages": [{"role": "user", "content": "2 + 2?"}]}
    (tmp_path / "bad.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    (tmp_path / "good.jsonl").write_text((REPO / "recipes" / "tiny" / "data" / "sft.jsonl").read_text())
    return tmp_path


@pytest.mark.parametrize(
    "argv, code",
    [
        (["sft", *SFT, "--output_dir", "np4/deeper/run", "--datasets", "bad.jsonl"], 2),
        (["sft", *SFT, "--output_dir", "np5/deeper/run", "--datasets", "bad.jsonl", "--label_preview", "true"], 2),
        (["sft", *SFT, "--output_dir", "kept/np6/deeper/run", "--datasets", "bad.jsonl"], 2),
        (["data", "preview", "sft", *SFT[:2], "--output_dir", "np7/deeper/run", "--datasets", "good.jsonl"], 0),
    ],
    ids=["refused", "refused-label-preview", "refused-under-an-existing-folder", "data-preview"],
)  # fmt: skip
def test_a_refused_run_or_a_preview_leaves_no_folder(argv, code, cwd, capsys):
    from alignkit.cli import main as cli

    assert cli(argv) == code
    err = capsys.readouterr().err
    if code == 2:
        assert "bad.jsonl, row 2" in err and "Fix" in err and "Traceback" not in err, err
    assert _tree(cwd) == BEFORE, "only what was there before (kept/ itself stays, empty)"


def test_the_recipe_entry_point_refused_leaves_no_folder(cwd):
    with pytest.raises(DataError, match=r"bad\.jsonl, row 2"):
        run_recipe("sft", [*SFT, "--output_dir", "np8/deeper/run", "--datasets", "bad.jsonl"])
    assert _tree(cwd) == BEFORE


def test_a_failed_write_removes_the_folders_it_made_and_only_while_empty(cwd):
    """staged_output (merge, export, eval, report, generate): a write that fails removes its scratch and the parents
    its lock made. remove_folders stops at the first folder holding anything, and never sees one that existed."""
    with pytest.raises(RuntimeError), staged_output(cwd / "kept" / "a" / "b" / "model") as scratch:
        (scratch / "weights.bin").write_bytes(b"x")
        raise RuntimeError("the converter failed")
    assert _tree(cwd) == BEFORE
    with staged_output(cwd / "kept" / "c" / "model.gguf", "file") as scratch:  # one that succeeds keeps its parents
        scratch.write_bytes(b"gguf")
    assert (cwd / "kept" / "c" / "model.gguf").read_bytes() == b"gguf"

    made = make_folders(cwd / "x" / "y" / "z")
    assert made == [cwd / "x" / "y" / "z", cwd / "x" / "y", cwd / "x"]
    assert make_folders(cwd / "x" / "y") == []  # it exists now: not this call's to remove
    (cwd / "x" / "y" / "note.txt").write_text("someone else's")  # written into a folder we made
    remove_folders(made)
    assert _tree(cwd / "x") == ["y", "y/note.txt"]  # z (empty) removed; y holds a file, so y and x stay


@pytest.mark.parametrize("entry", ["data-preview", "label-preview"])
def test_a_preview_never_touches_output_dir(entry, cwd, capsys):
    """A preview writes nothing, so it takes no output_dir at all, not even for a moment: one that cannot be made (its
    parent is a file) does not stop it, and in one that exists nothing changes (its entries, and its mtime, which any
    file made and removed there, such as a write probe, would move)."""
    from alignkit.cli import main as cli

    def preview(output_dir: str) -> int:
        if entry == "data-preview":
            return cli(["data", "preview", "sft", *SFT[:2], "--output_dir", output_dir, "--datasets", "good.jsonl"])
        return cli(["sft", *SFT, "--output_dir", output_dir, "--datasets", "good.jsonl", "--label_preview", "true"])

    (cwd / "kept" / "notes.txt").write_text("mine")
    mtime = (cwd / "kept").stat().st_mtime_ns
    assert preview("kept") == 0, capsys.readouterr().err[-2000:]
    assert _tree(cwd / "kept") == ["notes.txt"] and (cwd / "kept").stat().st_mtime_ns == mtime
    (cwd / "a_file").write_text("not a folder")
    assert preview("a_file/run") == 0, capsys.readouterr().err[-2000:]
    assert "label preview: " in capsys.readouterr().out  # the preview itself ran: one batch, trained tokens marked
