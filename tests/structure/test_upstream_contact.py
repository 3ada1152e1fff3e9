"""alignkit.speedups is the one place that patches upstream internals, and it knows what it touches: every private
trl/transformers/bitsandbytes name a row relies on still exists with the parameters the row uses (an upgrade that
renames one fails here, loudly, instead of silently losing the speed-up), the check is not blind (a renamed or
re-signed symbol is reported by name), and no other module patches upstream internals except the list in docs/architecture.md."""

import platform
import re
from pathlib import Path

import pytest

from alignkit import speedups

REPO = Path(__file__).resolve().parents[2]


def test_every_upstream_name_a_speedup_touches_still_fits():
    assert speedups.check_upstream() == []


def test_the_check_reads_upstream_through_an_applied_patch():
    """After cpu_lm_head replaced trl's function in this process, the check still reads trl's own."""
    from alignkit.speedups.lm_head import restore_trl_lm_head, use_cpu_lm_head

    try:
        assert use_cpu_lm_head()
        assert speedups.check_upstream() == []
    finally:
        restore_trl_lm_head()


def test_a_renamed_upstream_symbol_fails_the_check(monkeypatch):
    from trl.trainer import utils as trl_utils

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunctionRenamed", trl_utils._ChunkedLogProbFunction, raising=False)
    monkeypatch.delattr(trl_utils, "_ChunkedLogProbFunction")
    problems = speedups.check_upstream()
    assert any(p.startswith("cpu_lm_head: trl.trainer.utils:_ChunkedLogProbFunction.forward is gone") for p in problems)
    assert any(
        p.startswith("shared_prompt: trl.trainer.utils:_ChunkedLogProbFunction.forward is gone") for p in problems
    )


def test_a_changed_signature_or_closure_fails_the_check(monkeypatch):
    from transformers.integrations import sdpa_attention
    from trl.trainer import utils as trl_utils

    def sdpa_attention_forward(module, q, k, v, attention_mask, dropout=0.0, scaling=None, **kwargs):  # renamed params
        raise AssertionError

    def add_fused_lm_head(model, temperature=1.0, cast_lm_head_to_fp32=False, outputs=("log_probs",)):
        return None  # no _fused_forward closure over final_logit_softcapping / logit_scale any more

    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", sdpa_attention_forward)
    monkeypatch.setattr(trl_utils, "add_fused_lm_head", add_fused_lm_head)
    problems = "\n".join(speedups.check_upstream())
    assert "per_document_attention: transformers.integrations.sdpa_attention:sdpa_attention_forward takes" in problems
    assert "shared_prompt: trl.trainer.utils:add_fused_lm_head no longer uses ['_fused_forward'" in problems


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_glibc_still_has_mallopt():
    import ctypes

    assert callable(ctypes.CDLL(None).mallopt)


def test_the_table_is_whole():
    assert len(set(speedups.NAMES)) == len(speedups.NAMES)
    for row in speedups.SPEEDUPS:
        assert row.phase in speedups.PHASES, row.name
        assert row.doc, f"{row.name}: say what it does and which test proves it exact"
        tests = re.findall(r"tests/[\w/]+\.py", row.doc)
        assert all((REPO / t).is_file() for t in tests), f"{row.name}: {tests}"
        assert row.required or tests or "tests/regression" in row.doc, f"{row.name}: no exactness test named"


# What patching upstream internals looks like in this code base; tests/structure keeps it inside alignkit/speedups/.
PATCH_PATTERNS = {
    "replaces an upstream module attribute": r"^\s*(trl|transformers|peft|bnb|bitsandbytes|accelerate)\w*(\.\w+)+ = ",
    "reads a closure or code object": r"__closure__|__code__",
    "rebinds a method or a class": r"types\.MethodType|\.forward = |__class__ = ",
    "changes glibc's allocator": r"\bmallopt\b|malloc_trim|M_MMAP_MAX|M_TRIM_THRESHOLD|M_ARENA_MAX",
    "imports a private upstream name": r"from (trl|transformers|peft|bitsandbytes|accelerate|sentence_transformers)"
    r"[\w.]* import .*\b_[a-z]\w*",
    "overrides a private upstream method": r"def _load_model\b",
    "sets a flag upstream reads": r"accepts_loss_kwargs = |\[\"load_universal\"\] = |support_avx512bf16_for_cpu"
    r"|HF_HUB_OFFLINE = ",
}


def _scan(rel: str, text: str) -> list[str]:
    hits = []
    for n, line in enumerate(text.splitlines(), 1):
        code = line.split("#", 1)[0]
        hits += [f"{rel}:{n}: {what}: {line.strip()}" for what, p in PATCH_PATTERNS.items() if re.search(p, code)]
    return hits


def _patches() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in sorted((REPO / "alignkit").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if not rel.startswith("alignkit/speedups/") and (hits := _scan(rel, path.read_text())):
            found[rel] = hits
    return found


def _readme_exceptions() -> list[str]:
    layout = (REPO / "docs" / "architecture.md").read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    block = layout.split("Upstream internals are patched only in", 1)[1].split("\n\n", 2)[1]
    return re.findall(r"^\d+\. `([\w/]+\.py)`", block, flags=re.M)


def test_no_module_outside_speedups_patches_upstream_but_the_readme_list():
    exceptions = _readme_exceptions()
    assert 0 < len(exceptions) <= 5, exceptions
    found = _patches()
    unlisted = [hit for rel, hits in found.items() if rel not in exceptions for hit in hits]
    assert not unlisted, (
        "patches of upstream internals belong in alignkit/speedups/ (or docs/architecture.md's list):\n"
        + "\n".join(unlisted)
    )
    stale = [rel for rel in exceptions if rel not in found]
    assert not stale, f"docs/architecture.md lists {stale} as patching upstream internals, but they no longer do"


def test_the_patch_grep_is_not_blind():
    """Each kind of patch, planted in a module outside alignkit/speedups/, is found (the speed-ups' own lines are)."""
    planted = (REPO / "alignkit/speedups/lm_head.py").read_text() + (REPO / "alignkit/speedups/cpu.py").read_text()
    hits = "\n".join(_scan("alignkit/train/planted.py", planted))
    assert "replaces an upstream module attribute: trl_utils._ChunkedLogProbFunction = " in hits
    assert "changes glibc's allocator" in hits
