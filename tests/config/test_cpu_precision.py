"""The 'auto' precision rule on CPUs (alignkit.runtime): bf16 mixed precision only with bf16 units and a GEMM probe
that confirms bf16 is faster; an explicit dtype or bf16/fp16 key always wins. The rule is checked from facts (no test
depends on this machine's CPU kind); the AVX2 case runs in a child process with the ISA capped."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

from alignkit import runtime
from alignkit.config import DPOConfig, SFTConfig, parse_recipe

FAST = {"n": 512, "float32_gflops": 380.0, "bfloat16_gflops": 2382.0, "speedup": 6.27}  # AMX, benchmarks/README.md
SLOW = {"n": 256, "float32_gflops": 140.0, "bfloat16_gflops": 0.5, "speedup": 0.004}  # bf16 without units


@pytest.mark.parametrize(
    "setting, units, probe, bf16",
    [
        ("auto", [], None, False),  # AVX2-only: no probe, fp32
        ("auto", ["avx512_bf16"], SLOW, False),  # units, but oneDNN capped below them
        ("auto", ["avx512_bf16"], {**FAST, "speedup": 1.1}, False),  # not worth the casts
        ("auto", ["avx512_bf16"], {**FAST, "speedup": 2.2}, True),  # Zen 4
        ("auto", ["amx_bf16", "avx512_bf16"], FAST, True),  # Xeon with AMX
        ("off", ["amx_bf16"], FAST, False),
        ("on", [], None, True),
    ],
)
def test_rule(setting, units, probe, bf16):
    chosen, why = runtime.choose_cpu_amp(setting, units, probe)
    assert chosen is bf16 and why


@pytest.fixture
def amp_on(monkeypatch):
    """The rule forced to bf16 (as on a CPU with bf16 units whose probe passed), the cache cleared around it."""
    monkeypatch.setenv(runtime.CPU_AMP_ENV, "on")
    runtime.cpu_mixed_precision.cache_clear()
    yield
    runtime.cpu_mixed_precision.cache_clear()


SFT = REPO / "recipes" / "tiny" / "sft.yaml"  # QLoRA: the 4-bit compute dtype is the key
DPO = REPO / "recipes" / "tiny" / "dpo.yaml"


def test_auto_means_bf16_autocast_on_fp32_weights(amp_on):
    recipe = parse_recipe(SFTConfig, ["--config", str(SFT)])
    assert recipe.train.bf16 and recipe.train.use_cpu
    assert runtime.compute_dtype_name("auto") == "bfloat16" and runtime.auto_dtype_name("auto") == "float32"
    assert recipe.resolved()["SFTConfig"]["bf16"] is True  # --print_config and the saved config show it
    full = parse_recipe(DPOConfig, ["--config", str(DPO), "--load_in_4bit", "false"])
    assert full.train.bf16 and runtime.resolve_dtype(full.model.dtype).is_floating_point


@pytest.mark.parametrize(
    "argv",
    [
        ["--bnb_4bit_compute_dtype", "float32"],  # the 4-bit run's dtype key, explicit
        ["--load_in_4bit", "false", "--dtype", "float32"],
        ["--bf16", "false"],
        ["--use_cpu", "false"],
    ],
)
def test_an_explicit_key_wins(amp_on, argv):
    assert not parse_recipe(SFTConfig, ["--config", str(SFT), *argv]).train.bf16


def test_off_and_the_default_suite_setting_mean_fp32():
    assert os.environ[runtime.CPU_AMP_ENV] == "off"  # tests/conftest.py: no test depends on the CPU kind
    runtime.cpu_mixed_precision.cache_clear()
    assert not parse_recipe(SFTConfig, ["--config", str(SFT)]).train.bf16
    assert runtime.compute_dtype_name("auto") == "float32"


def test_avx2_picks_fp32():
    """With oneDNN, MKL and ATen capped at AVX2 (an AVX2-only CPU's kernels) and the rule on 'auto', the probe finds bf16
    GEMMs slow (or the CPU has no bf16 units at all) and 'auto' stays fp32."""
    caps = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    code = "import json; from alignkit import runtime; print(json.dumps(runtime.cpu_mixed_precision()))"
    env = {**os.environ, **caps, runtime.CPU_AMP_ENV: "auto", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    result = json.loads(out.splitlines()[-1])
    assert result["bf16"] is False, result
    assert result["probe"] is None or result["probe"]["speedup"] < runtime.PROBE_MIN_SPEEDUP
