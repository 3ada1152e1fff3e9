"""Quiet by default (alignkit/quiet.py): a stage prints no third-party warning line; the known lines are dropped by
logger and text only, and -v / ALIGNKIT_VERBOSE=1 shows them."""

import ast
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from alignkit.models.trained import quiet_head_report

REPO = Path(__file__).resolve().parents[1]
# What a third-party warning line looks like: warnings.warn's "file:line: SomethingWarning: ...", a logging record at
# WARNING (DeepSpeed's "[WARNING]", the default handler's plain text is caught by the words), or a deprecation notice.
WARNING_LINE = re.compile(r"Warning: |\[WARNING\]|WARNING (?!alignkit)|is deprecated|Failed to load|warnings\.warn")

PLANTED = """
import logging, warnings
import alignkit  # installs the filters
logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
    "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'. Please make sure ...")
logging.getLogger("bitsandbytes.backends.cpu.ops").warning("another bitsandbytes line")
logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were ...")
tp = logging.getLogger("transformers.distributed.tensor_parallel")
tp.warning("The following layers were not sharded: model.norm.weight, model.layers.*.input_layernorm.weight")
tp.warning("The following TP rules were not applied on any of the layers: {'layers.*.mlp.up_proj': 'colwise'}")
tp.warning("another tensor-parallel line")
bnb = logging.getLogger("transformers.integrations.bitsandbytes")
bnb.warning("The modules are dequantized in torch.float32 and casted to torch.float32.")
bnb.warning("The modules are dequantized in torch.float32. If you want to change the dtype, please specify ...")
warnings.warn("'pin_memory' argument is set as true but no accelerator is found, then device pinned memory ...")
warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
warnings.warn("another warning")
"""


def _planted(**env) -> str:
    done = subprocess.run(
        [sys.executable, "-c", PLANTED], capture_output=True, text=True, cwd=REPO, check=True,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
    )  # fmt: skip
    return done.stderr


def test_known_lines_are_dropped_and_nothing_else():
    quiet = _planted()
    assert "another bitsandbytes line" in quiet and "another warning" in quiet
    assert "another tensor-parallel line" in quiet and "If you want to change the dtype" in quiet
    known = (r"kernels-community|Setting accelerator|pin_memory|is_gradient_checkpointing|not sharded|TP rules|"
             r"casted to")  # fmt: skip
    assert not re.search(known, quiet), quiet
    loud = _planted(ALIGNKIT_VERBOSE="1")
    for text in ("kernels-community", "Setting accelerator to CPU", "pin_memory", "is_gradient_checkpointing",
                 "were not sharded", "TP rules were not applied", "casted to torch.float32"):  # fmt: skip
        assert text in loud, text


def test_tiny_sft_prints_no_third_party_warning(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "alignkit.cli", "sft", "--config", "recipes/tiny/sft.yaml", "--max_steps", "2",
         "--output_dir", str(tmp_path / "sft")],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = (done.stdout + done.stderr).replace("\r", "\n").splitlines()
    noise = [line for line in lines if WARNING_LINE.search(line)]
    assert not noise, "third-party warning lines:\n" + "\n".join(noise)
    assert WARNING_LINE.search("x.py:3: FutureWarning: `gradient_checkpointing` is deprecated")  # the check can see


RECIPES = sorted(p for p in (REPO / "recipes").glob("*.py") if p.name != "__init__.py")


def _module_level_imports(tree: ast.Module) -> list[str]:
    """The modules a file imports when it is run, in order (imports inside functions run later, after alignkit)."""
    found, todo = [], list(tree.body)
    while todo:
        node = todo.pop(0)
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append(node.module or "")
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            todo[:0] = [child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt)]
    return found


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_imports_alignkit_before_any_third_party_module(recipe):
    """alignkit's import installs the filters (and its environment defaults): a third-party module a recipe imports
    first (transformers' trainers import bitsandbytes) prints its lines before they exist."""
    modules = [m.split(".")[0] for m in _module_level_imports(ast.parse(recipe.read_text()))]
    third_party = [m for m in modules if m not in sys.stdlib_module_names and m != "__future__"]
    assert third_party and third_party[0] == "alignkit", f"{recipe.name} imports {third_party[:1]} before alignkit"


def _bitsandbytes_prints_its_kernels_line() -> bool:
    """bitsandbytes 0.50 looks for its Hub CPU kernel, and logs the 'kernels-community' line when that fails, only on
    CPUs with AVX512-BF16 (its native ``has_avx512bf16``): an AVX2-only CPU prints nothing to hide."""
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def test_bad_key_run_of_a_recipe_prints_only_the_error():
    """`python recipes/task.py` with a misspelt key: the ConfigError and nothing else; with ALIGNKIT_VERBOSE=1 the
    bitsandbytes line shows where bitsandbytes prints one on this CPU (so this run does import bitsandbytes and the
    check can see it there); on other CPUs the quiet run is still one line."""
    argv = [sys.executable, "recipes/task.py", "--config", "recipes/tiny/task_cls.yaml", "--lable_list", "a"]
    prints_line = _bitsandbytes_prints_its_kernels_line()
    for verbose in ("0", "1"):
        done = subprocess.run(
            argv, capture_output=True, text=True, cwd=REPO, timeout=300,
            env={**os.environ, "PYTHONPATH": str(REPO), "ALIGNKIT_VERBOSE": verbose},
        )  # fmt: skip
        assert done.returncode == 2 and "unknown key 'lable_list'" in done.stderr, done.stderr[-2000:]
        assert ("kernels-community" in done.stdout + done.stderr) == (verbose == "1" and prints_line), done.stderr[
            -2000:
        ]
        if verbose == "0":
            lines = (done.stdout + done.stderr).strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("alignkit: ConfigError"), done.stdout + done.stderr


def test_quiet_head_report_drops_the_load_report_and_leaves_the_logger_level():
    """transformers 5 runs its tensor-parallel plan check (the "not sharded" lines) when transformers.modeling_utils'
    own level is WARNING or above: quiet_head_report drops the load report by a filter, the level stays."""
    log, seen = logging.getLogger("transformers.modeling_utils"), []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    log.addHandler(handler)
    level = log.level
    try:
        with quiet_head_report():
            assert log.level == level
            log.warning("MODEL LOAD REPORT: newly initialized: score.weight")
            log.error("a real error")
        log.warning("after the load")
    finally:
        log.removeHandler(handler)
    assert seen == ["a real error", "after the load"] and log.level == level and not log.filters


def test_loading_an_adapter_run_prints_no_tensor_parallel_line(sft_3_steps):
    """An adapter run's base loads under quiet_head_report (load_trained: merge, chat, eval, generate; a DPO or
    reward run starting from it): no "not sharded" line even with every filter off (ALIGNKIT_VERBOSE=1)."""
    code = f"from alignkit.models import load_trained; load_trained({str(sft_3_steps)!r}); print('loaded')"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO), "ALIGNKIT_VERBOSE": "1"},
    )  # fmt: skip
    assert done.returncode == 0 and "loaded" in done.stdout, done.stderr[-3000:]
    assert not re.search(r"not sharded|TP rules", done.stderr), done.stderr[-3000:]
