"""The Ollama Modelfile beside every GGUF (issue 40).

For each family of the chat-format table that Ollama has a template for, TEMPLATE and the stop parameters equal
Ollama's published ones: the test data in ``data/ollama/`` are verbatim copies of ollama/ollama's ``template/``
files (``SOURCE.json``: repository, commit, path and sha256 of each). Which template Ollama has for a family is
decided as Ollama decides it on ``ollama create``: ``template.Named`` (template/template.go) picks the
``index.json`` entry with the least Levenshtein distance to the GGUF's chat template, if under 100. The trained
stop tokens (what chat, the merged generation_config and the export gate stop on) are all stopped on, as a stop
parameter or as the eos llama.cpp always stops on; a family without an Ollama template says so instead of guessing.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from alignkit.data.chat_families import FAMILIES, family_names, stock_template
from alignkit.export.modelfile import OLLAMA_DIFFERS, OLLAMA_FOR_FAMILY, OLLAMA_TEMPLATES, modelfile_text

DATA = Path(__file__).parent / "data" / "ollama"
# What Ollama's matcher picks for each family's stock template (None: no entry within distance 100).
OLLAMA_PICKS = {
    "llama3": "llama3-instruct", "llama3_1": "llama3-instruct", "gemma": "gemma-instruct",
    "gemma3": "gemma3-instruct", "mistral": "mistral-instruct", "smollm2": "chatml", "phi3": "zephyr",
}  # fmt: skip
# alignkit's choices beyond the matcher's (each said in alignkit/export/modelfile.py): phi3's text is matched to
# zephyr, which ends turns with </s>, not Phi-3's <|end|>; alignkit's own chatml and Qwen2.5 (no Ollama template)
# get Ollama's ChatML, Phi-3.5 Ollama's Phi-3 (its layout).
OVERRIDES = {"phi3": "phi-3", "phi3_5": "phi-3", "chatml": "chatml", "qwen2_5": "chatml"}


def _levenshtein(a: str, b: str) -> int:
    """Levenshtein distance in code points (as Go's levenshtein over runes), by Myers' bit-parallel algorithm
    (Hyyro's form for the global distance): one big-integer step per character of ``b``."""
    if not a:
        return len(b)
    mask = (1 << len(a)) - 1
    peq: dict[str, int] = {}
    for i, c in enumerate(a):
        peq[c] = peq.get(c, 0) | (1 << i)
    pv, mv, score, top = mask, 0, len(a), 1 << (len(a) - 1)
    for c in b:
        eq = peq.get(c, 0)
        xv = eq | mv
        xh = ((((eq & pv) + pv) & mask) ^ pv) | eq
        ph = mv | (~(xh | pv) & mask)
        mh = pv & xh
        score += 1 if ph & top else -1 if mh & top else 0
        ph = ((ph << 1) | 1) & mask
        mh = (mh << 1) & mask
        pv = mh | (~(xv | ph) & mask)
        mv = ph & xv
    return score


def ollama_named(template: str) -> str | None:
    """Ollama's template.Named: the first index.json entry with the least distance, if under 100."""
    best, name = 100, None
    for entry in json.loads((DATA / "index.json").read_text(encoding="utf-8")):
        if abs(len(entry["template"]) - len(template)) < best:  # the distance is at least the length difference
            d = _levenshtein(template, entry["template"])
            if d < best:
                best, name = d, entry["name"]
    return name


def test_the_test_data_are_ollamas_files_as_fetched():
    source = json.loads((DATA / "SOURCE.json").read_text())
    assert source["repository"] == "https://github.com/ollama/ollama" and len(source["commit"]) == 40
    files = {p.name for p in DATA.iterdir()} - {"SOURCE.json"}
    assert files == set(source["files"])
    for name, entry in source["files"].items():
        assert entry["path"] == f"template/{name}"
        assert hashlib.sha256((DATA / name).read_bytes()).hexdigest() == entry["sha256"], name


def test_the_families_ollama_recognises_get_its_template_and_stop_parameters():
    picks = {name: ollama_named(stock_template(name)) for name in family_names()}
    assert {k: v for k, v in picks.items() if v} == OLLAMA_PICKS
    assert OLLAMA_FOR_FAMILY == {**OLLAMA_PICKS, **OVERRIDES}
    for name in set(OLLAMA_FOR_FAMILY.values()):
        stops = json.loads((DATA / f"{name}.json").read_text())["stop"]
        assert OLLAMA_TEMPLATES[name] == ((DATA / f"{name}.gotmpl").read_text(encoding="utf-8"), tuple(stops)), name


def _saved(tmp_path, family):
    from alignkit.testing.families import family_tokenizer

    tokenizer = family_tokenizer(family)
    tokenizer.save_pretrained(tmp_path / family)
    return tmp_path / family, tokenizer


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_modelfile_writes_ollamas_template_and_stops_and_stops_on_every_trained_token(tmp_path, family):
    from alignkit.data.templates import end_of_turn_ids

    folder, tokenizer = _saved(tmp_path, family)
    text, found = modelfile_text(folder, folder / "m-f16.gguf")
    assert found == family
    assert text.splitlines()[1] == "FROM ./m-f16.gguf"
    stops = re.findall(r'^PARAMETER stop "(.*)"$', text, flags=re.M)
    trained = tokenizer.convert_ids_to_tokens(end_of_turn_ids(tokenizer))
    assert FAMILIES[family].end_of_turn in trained
    name = OLLAMA_FOR_FAMILY.get(family)
    if name:
        template = (DATA / f"{name}.gotmpl").read_text(encoding="utf-8")
        assert re.findall(r'^TEMPLATE """(.*?)"""$', text, flags=re.M | re.S) == [template]
        ollama = json.loads((DATA / f"{name}.json").read_text())["stop"]
        added = [t for t in trained if t not in ollama and t != tokenizer.eos_token]  # Llama 3.1's <|eom_id|>
        assert stops == [*ollama, *added]  # Ollama's, in its order, then the trained ones it lacks
        assert set(trained) <= {*stops, tokenizer.eos_token}  # the eos: llama.cpp's end of generation
        assert family not in OLLAMA_DIFFERS or OLLAMA_DIFFERS[family] in text
    else:
        assert not re.search(r"^TEMPLATE", text, flags=re.M) and "Ollama publishes no template" in text
        assert stops == trained


def test_the_default_system_prompt_is_the_one_the_template_inserts(tmp_path):
    folder, tokenizer = _saved(tmp_path, "smollm2")
    text, _ = modelfile_text(folder, folder / "m.gguf")
    system = re.search(r'^SYSTEM """(.*)"""$', text, flags=re.M).group(1)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert rendered.startswith(f"<|im_start|>system\n{system}<|im_end|>\n") and "SmolLM" in system
    folder, _ = _saved(tmp_path, "llama3")
    assert "SYSTEM" not in modelfile_text(folder, folder / "m.gguf")[0]
