"""Model cards: a CPT -> SFT -> DPO chain's card names all three stages with their data and settings."""

import json
import re


def _lineage_rows(card: str) -> list[list[str]]:
    return [
        [c.strip() for c in line.strip("|").split("|")] for line in card.splitlines() if re.match(r"\| \d+ \|", line)
    ]


def test_chain_card_names_all_three_stages(chain):
    card = (chain.dpo / "README.md").read_text()
    rows = _lineage_rows(card)
    assert [r[1] for r in rows] == ["cpt", "sft", "dpo"]
    # data files by name, data rows and sha256 (never the local path); stages by run name
    import hashlib

    from conftest import TINY_DATA

    expected = []
    for s in ("cpt", "sft", "dpo"):
        data = (TINY_DATA / f"{s}.jsonl").read_bytes()
        rows_in_file = sum(1 for line in data.decode().splitlines() if line.strip())
        expected.append(f"`{s}.jsonl` (x1.0, {rows_in_file} rows, sha256 {hashlib.sha256(data).hexdigest()[:12]})")
    assert [r[2] for r in rows] == expected
    assert [r[6] for r in rows] == [f"`{p.name}`" for p in (chain.cpt, chain.sft, chain.dpo)]
    assert [r[5] for r in rows] == ["-", "continue", "continue"]  # hand-offs
    assert all(r[4] == "4-bit nf4" for r in rows)
    assert "# CPT -> SFT -> DPO output" in card and "library_name: peft" in card
    assert "<summary>dpo settings</summary>" in card and "beta: 0.1" in card and "block_size: 64" in card
    meta = json.loads((chain.dpo / "alignkit_run.json").read_text())
    assert f"| eval_loss | {meta['metrics']['eval_loss']} |" in card
