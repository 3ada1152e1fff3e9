"""`alignkit chat`, `generate` and `eval` on a tiny SFT run (issue 21): the run's adapter loaded on its base, its
chat template and stop tokens; chat driven through piped stdin (one prompt per line in, one reply per line out)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from conftest import REPO, TINY_DATA, run_recipe
from regression.margins import GENERATION_SFT, chat_reference

ROWS = [json.loads(line) for line in (TINY_DATA / "sft.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """tiny:llama_base trained (150 steps) towards the data's format. What it generates depends on rounding (an
    undertrained tiny model), so the tests below assert what alignkit guarantees on any weights: the same replies as
    the Python API, cut at the first end-of-turn token."""
    out = tmp_path_factory.mktemp("gen") / "sft"
    run_recipe("sft", [*GENERATION_SFT, "--output_dir", str(out)])
    return out


def _alignkit(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "alignkit.cli", *argv],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )


def test_chat_reads_piped_prompts_and_stops_at_the_end_of_turn(sft_run):
    """Each printed reply is the model's greedy continuation of the conversation so far, cut at its first
    end-of-turn token (computed here with no stop token at all): chat stops exactly there, on any weights. The run
    is trained enough that its replies stop within 60 tokens (3 of 3 under each ISA setting: tests.regression.margins);
    at least one must, so the cut is tested."""
    from alignkit.export.generate import load_for_generation

    prompts = [r["messages"][1]["content"] for r in ROWS[:3]]
    done = _alignkit("chat", str(sft_run), "--max_new_tokens", "60", stdin="\n".join(prompts) + "\n")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.split("\n")  # one line per reply, each ended by a newline (an empty reply is an empty line)
    assert lines[-1] == "", done.stdout
    replies = lines[:-1]
    model, tokenizer = load_for_generation(sft_run)
    want = chat_reference(model, tokenizer, prompts, 60)
    assert replies == [t["reply"] for t in want], (replies, want)
    assert any(t["stopped"] for t in want), want


def test_generate_writes_a_reply_per_prompt(sft_run, tmp_path):
    """One reply per prompt row, in order, each row kept, equal to the Python API's replies on the same weights."""
    from alignkit.export.generate import generate_replies, load_for_generation

    prompts = tmp_path / "prompts.jsonl"
    rows = [{"id": i, "messages": r["messages"][:-1]} for i, r in enumerate(ROWS[:5])]
    rows.append({"id": 5, "prompt": "What is 10 + 10?"})
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "replies.jsonl"
    done = _alignkit("generate", str(sft_run), "--prompts", str(prompts), "--out", str(out), "--max_new_tokens", "40")
    assert done.returncode == 0, done.stderr[-2000:]
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: v for k, v in w.items() if k != "reply"} for w in written] == rows
    model, tokenizer = load_for_generation(sft_run)
    conversations = [r["messages"] for r in rows[:5]] + [[{"role": "user", "content": rows[5]["prompt"]}]]
    assert [w["reply"] for w in written] == generate_replies(model, tokenizer, conversations, 8, max_new_tokens=40)


def test_eval_scores_replies_and_writes_them_next_to_the_summary(sft_run, tmp_path):
    from rouge_score.rouge_scorer import RougeScorer

    from alignkit.export.generate import generate_replies, load_for_generation

    data = tmp_path / "held_out.jsonl"
    data.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in ROWS[:8]))
    out = sft_run / "eval"  # the default --out: where alignkit report finds it
    done = _alignkit("eval", str(sft_run), "--data", str(data), "--metric", "rouge")
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["metric"] == "rouge" and summary["rows"] == 8 and 0.0 <= summary["rougeL"] <= 1.0, summary
    assert json.loads((out / "eval_summary.json").read_text()) == summary
    rows = [json.loads(line) for line in (out / "eval_rows.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all({"prompt", "reference", "reply", "rougeL"} <= set(r) for r in rows)
    # on any weights: the replies are the Python API's, each row scored on its own reply and reference by
    # rouge-score itself, the summary their mean
    model, tokenizer = load_for_generation(sft_run)
    assert [r["reply"] for r in rows] == generate_replies(model, tokenizer, [r["messages"][:-1] for r in ROWS[:8]])
    assert [r["reference"] for r in rows] == [r["messages"][-1]["content"] for r in ROWS[:8]]
    scorer = RougeScorer(["rougeL"], use_stemmer=True)
    want = [scorer.score(r["reference"], r["reply"])["rougeL"].fmeasure for r in rows]
    assert [r["rougeL"] for r in rows] == pytest.approx(want)
    assert summary["rougeL"] == pytest.approx(sum(want) / len(want))
    # runs' evaluations side by side in the training report
    from alignkit.export.report import write_report

    page = write_report([sft_run], tmp_path / "report").html.read_text()
    assert "Evaluations (alignkit eval)" in page and f"rougeL {summary['rougeL']:.4g}" in page


def test_eval_regex_and_bad_input(sft_run, tmp_path, capsys):
    from alignkit.cli import main
    from alignkit.export.evaluate import score

    rows, summary = score(["x ANSWER: 12", "no answer", "ANSWER: 7"], [12, 3, "8"], "regex", r"ANSWER:\s*(-?\d+)")
    assert summary == {"format": 2 / 3, "exact": 1 / 3} and rows[0] == {"format": True, "exact": True}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    done = _alignkit("eval", str(sft_run), "--data", str(bad))  # the console entry point, in its own process
    assert done.returncode == 2 and "bad.jsonl, row 1" in done.stderr and "Fix" in done.stderr
    assert "Traceback" not in done.stderr
    # the same main() in this process for the other cases (each subprocess costs a torch import)
    capsys.readouterr()
    for argv, says in (
        (["eval", str(sft_run), "--data", str(bad), "--metric", "regex"], "bad.jsonl, row 1"),
        (["eval", str(sft_run), "--data", str(tmp_path / "nope.jsonl")], "nope.jsonl: file not found. Fix"),
        (["generate", str(sft_run), "--prompts", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")],
         "nope.jsonl: file not found. Fix"),
    ):  # fmt: skip
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, err


@pytest.mark.parametrize(
    "reader, row, says",
    [
        ("prompts", {"prompt": 5}, "has neither 'messages' nor a 'prompt' (text)"),
        ("prompts", {"messages": ["hi"]}, "messages[0] lacks 'role' or 'content'"),
        ("prompts", {"messages": [{"role": "assistant", "content": "x"}]}, "no user turn before the final reply"),
        ("prompts", {"messages": [{"role": "user"}]}, "messages[0] lacks 'role' or 'content'"),
        ("prompts", {"messages": [{"role": "user", "content": 5}]}, "content that is not text"),
        ("eval", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "answer": "a"},
         "which is the reference"),
        ("eval", {"messages": [{"role": "assistant", "content": "x"}]}, "needs 'messages' ending on the reference"),
        ("eval", {"prompt": "q", "answer": None}, "'answer' is None"),
        ("eval", {"messages": ["a", "b"]}, "messages[0] lacks 'role' or 'content'"),
    ],
)  # fmt: skip
def test_prompt_and_eval_rows_are_checked_before_the_model_loads(reader, row, says, tmp_path):
    from alignkit.errors import DataError
    from alignkit.export.evaluate import read_eval_rows
    from alignkit.export.generate import read_prompts

    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=rf"rows.jsonl, row 1: .*{re.escape(says)}.*Fix"):
        (read_prompts if reader == "prompts" else read_eval_rows)(path)


def _held_out_copies(rows: list[dict], folder) -> list:
    """The same rows as each held-out file docs/data.md names: JSON lines (.jsonl, and in a .json), a JSON array,
    each compressed (.gz, .bz2, .xz), and parquet."""
    import bz2
    import gzip
    import lzma

    import datasets

    lines, array = "".join(json.dumps(r) + "\n" for r in rows).encode(), json.dumps(rows).encode()
    files = {"held.jsonl": lines, "held_lines.json": lines, "held.json": array, "held.jsonl.gz": gzip.compress(lines),
             "held.jsonl.bz2": bz2.compress(lines), "held.json.xz": lzma.compress(array)}  # fmt: skip
    for name, data in files.items():
        (folder / name).write_bytes(data)
    datasets.Dataset.from_list(rows).to_parquet(str(folder / "held.parquet"))
    return [folder / name for name in files] + [folder / "held.parquet"]


def test_every_held_out_file_of_the_same_rows_is_read_the_same_way(tmp_path):
    """An ordinary SFT file (messages ending on the assistant's reply, as `alignkit init sft` writes them) is read
    alike by generate and eval, whatever the file's name or compression: the prompt is the messages before the final
    reply, the reference that reply, the rows written back as read. alignkit's own layout (messages ending on the
    user, a prompt, an answer) likewise: a .jsonl.gz or a JSON array of them is no training format."""
    from alignkit.errors import DataError
    from alignkit.export.evaluate import read_eval_rows
    from alignkit.export.generate import read_prompts

    sft, own = tmp_path / "sft", tmp_path / "own"
    sft.mkdir(), own.mkdir()
    want = [r["messages"][:-1] for r in ROWS[:3]]
    for path in _held_out_copies(ROWS[:3], sft):
        assert read_prompts(path) == (ROWS[:3], want), path
        assert read_eval_rows(path) == (want, [r["messages"][-1]["content"] for r in ROWS[:3]]), path
    user = [{"role": "user", "content": "2 + 2?"}]
    rows = [{"messages": user, "answer": "4"}, {"messages": [*user, {"role": "assistant", "content": "4"}]},
            {"messages": user, "answer": "four"}]  # fmt: skip
    for path in _held_out_copies(rows, own)[:-1]:  # (parquet: one type per column)
        assert read_prompts(path) == (rows, [user] * 3), path
        assert read_eval_rows(path) == ([user] * 3, ["4", "4", "four"]), path
    import gzip

    (own / "bad.jsonl.gz").write_bytes(gzip.compress(b'{"messages": [{"role": "user", "content": "q"}]}\n'))
    with pytest.raises(DataError, match=r"bad.jsonl.gz, row 1: needs 'messages' ending on the reference reply"):
        read_eval_rows(own / "bad.jsonl.gz")  # the same refusal as for the plain file: no reference to score against


def test_generate_answers_an_sft_file_plain_or_compressed(tmp_path):
    """`alignkit generate` on 3 rows of the sample SFT data (each ending on the assistant's reply), as .jsonl and as
    .jsonl.gz: exit 0, each row written back as read with its reply, the replies the same for both files and equal to
    the Python API's greedy replies to the messages before each final reply (tiny:llama's own weights)."""
    import gzip

    from alignkit.export.generate import generate_replies, load_for_generation
    from alignkit.testing import tiny_model_path

    model_dir = tiny_model_path("llama")
    text = "".join(json.dumps(r) + "\n" for r in ROWS[:3])
    (tmp_path / "held.jsonl").write_text(text)
    (tmp_path / "held.jsonl.gz").write_bytes(gzip.compress(text.encode()))
    replies = {}
    for name in ("held.jsonl", "held.jsonl.gz"):
        out = tmp_path / f"{name}.replies.jsonl"
        done = _alignkit("generate", str(model_dir), "--prompts", str(tmp_path / name), "--out", str(out),
                         "--max_new_tokens", "6")  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        written = [json.loads(line) for line in out.read_text().splitlines()]
        assert [{k: v for k, v in w.items() if k != "reply"} for w in written] == ROWS[:3]
        replies[name] = [w["reply"] for w in written]
    model, tokenizer = load_for_generation(model_dir)
    want = generate_replies(model, tokenizer, [r["messages"][:-1] for r in ROWS[:3]], 8, max_new_tokens=6)
    assert replies["held.jsonl"] == replies["held.jsonl.gz"] == want


def test_a_regex_group_that_does_not_take_part_is_no_match():
    from alignkit.export.evaluate import score

    rows, summary = score(["nothing here"], ["x"], "regex", "(ZZZ)?")
    assert rows == [{"format": False, "exact": False}] and summary == {"format": 0.0, "exact": 0.0}
