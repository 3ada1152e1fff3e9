"""The benchmarks run end to end at tiny size, in this process, so that they cannot rot. No timing assertions: timings
are what benchmarks/ prints, on a quiet machine."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # the scripts import their harness by name, as `python benchmarks/x.py` does
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_sft_benchmark_prints_its_table(capsys):
    rows = _load("sft").main(["--size", "tiny", "--steps", "2", "--repeats", "1", "--gemm_n", "256"], in_process=True)
    assert [r["variant"] for r in rows] == ["alignkit", "alignkit_fp32", "trl_defaults", "trl_tuned"]
    # the suite's ALIGNKIT_CPU_AMP=off: 'auto' and trl tuned are fp32 on every CPU; trl's default is bf16 autocast
    assert [r["dtype"] for r in rows] == ["fp32", "fp32", "bf16", "fp32"]
    assert rows[3]["batching"] == "padding-free" and not rows[3]["grad_ckpt"]
    for row in rows:
        assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 100 and math.isfinite(row["final_loss"])
    out = capsys.readouterr().out
    assert "alignkit/this tok/s" in out and "MFU % (fastest probe)" in out and out.count("trl_") == 2


def test_dpo_benchmark_prints_its_table(capsys):
    rows = _load("dpo").main(["--size", "tiny", "--steps", "2", "--repeats", "1"], in_process=True)
    assert [r["variant"] for r in rows] == ["alignkit", "alignkit_fp32", "trl_defaults", "trl_tuned"]
    for row in rows:
        assert row["samples_per_s"] > 0 and math.isfinite(row["final_loss"])
    assert "pairs/s" in capsys.readouterr().out


def test_4bit_memory_benchmark_counts_packed_weights():
    full, quantized = _load("memory_4bit").main(["--size", "tiny"])
    assert full["4-bit packed"] == 0 and quantized["4-bit packed"] > 0 and quantized["quant constants"] > 0
    assert 0 < quantized["ratio"] < 1


def test_task_precision_benchmark_data_round_trips_through_the_readers(tmp_path):
    import json

    from alignkit.data.file_formats import read_conll, read_squad

    bench = _load("task_precision")
    rows, _ = read_conll(bench.write_conll(tmp_path / "x.conll").read_text(), "x.conll")
    jsonl = [json.loads(line) for line in (bench.TASK_DATA / "ner.jsonl").read_text().splitlines()]
    assert rows == [{"tokens": r["tokens"], "ner_tags": r["ner_tags"]} for r in jsonl]  # written IOB1, read IOB2
    squad = read_squad(bench.write_squad(tmp_path / "x.json").read_text(), "x.json")
    qa = [json.loads(line) for line in (bench.TASK_DATA / "qa_large.jsonl").read_text().splitlines() if line.strip()]
    assert [(r["question"], r["context"], r["answers"]) for r in squad] == [
        (r["question"], r["context"], r["answers"]) for r in qa
    ]


def test_gemm_probe_stops_a_dtype_at_its_time_box():
    found = _load("gemm").probe("float32", n=16384, budget=0.3)  # 16384^3 is ~9 TFLOP: no CPU fits it in 0.3 s
    assert found["timeboxed"] and 256 <= found["n"] < 16384 and found["flops"] > 0


def test_attention_benchmark_compares_equal_outputs(capsys):
    rows = _load("attention").main(["--rows", "3", "--max_length", "40", "--repeats", "1"])
    assert [r["variant"] for r in rows] == ["sdpa, block-diagonal mask", "sdpa_per_document"]
    out = capsys.readouterr().out
    assert "load average" in out and "ISA" in out
    assert float(out.split("max |difference| ")[1].split()[0]) < 1e-5


def test_profile_sorts_ops_into_categories():
    from torch.profiler import ProfilerActivity, profile

    profile_step = _load("profile_step")
    x, w, lora_a = torch.randn(64, 128), torch.randn(128, 128), torch.randn(128, 16)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(3):
            (x @ w + torch.nn.functional.dropout(x, 0.1) @ lora_a @ lora_a.T).relu()
    found = profile_step.shares(prof, wall_seconds=10.0)["seconds"]
    assert found["GEMM"] > 0 and found["LoRA"] > 0 and found["elementwise"] > 0
    assert found["attention"] == 0 and found["optimizer"] == 0 and found["python/other"] > 0


def test_run_all_plans_every_table_and_gpu_check_parses():
    import subprocess

    quick, full = (_load("run_all").plan(q) for q in (True, False))
    scripts = {s for s, _, _ in full}
    assert {"gemm.py", "attention.py", "sft.py", "dpo.py", "memory_4bit.py", "profile_step.py"} <= scripts
    assert all((BENCH / s).exists() for s, _, _ in full) and len(quick) < len(full)
    subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")], check=True)


def test_a_child_past_its_time_box_is_stopped_and_reported_as_a_bound(tmp_path):
    """A stand-in child that trains one step in ~1 s and then hangs: stopped soon after the 2 s box, its rate an
    upper bound ((1 step done + 1) x batch / seconds), alignkit's ratio over it a lower bound."""
    _load("gemm")  # puts benchmarks/ on sys.path
    import harness

    child = tmp_path / "slow_child.py"
    child.write_text(
        "import os, sys, time\n"
        "stamp = lambda e: open(os.environ['BENCH_STEPS_FILE'], 'a').write(f'{time.time():.3f} {e}\\n')\n"
        "stamp('begin'); time.sleep(1.0); stamp('step 1'); time.sleep(120)\n"
    )
    row = harness._run_child(str(child), "trl_defaults", [], time_box=2.0, batch=4)
    assert row["time_boxed"] and row["steps_done"] == 1 and 2.0 <= row["seconds"] < 30
    assert row["samples_per_s"] == pytest.approx(2 * 4 / row["seconds"])
    rows = [{"variant": "alignkit", "samples_per_s": 1.0, "peak_mib": 10.0, "final_loss": 1.0}, {"variant": "x", **row}]
    harness.add_ratios(rows, "samples_per_s")
    assert rows[1]["speedup"] == pytest.approx(1.0 / row["samples_per_s"]) and rows[1]["memory_ratio"] is None
    assert "1 of 6 steps" in harness.boxed_note(rows, 6)


def test_compile_benchmark_reports_every_step():
    module = _load("compile")
    assert module.VARIANTS == ["alignkit", "alignkit_compiled"] and module.STEADY_FROM >= 2


@pytest.mark.parametrize(
    ("variant", "runs", "alignkit_applies"),
    [("alignkit_glibc_malloc", "alignkit", False), ("trl_tuned_mallopt", "trl_tuned", True)],
)
def test_allocator_variants_isolate_the_mallopt_setting(variant, runs, alignkit_applies):
    """--variants alignkit_glibc_malloc / trl_tuned_mallopt: alignkit without its allocator setting, trl tuned with it
    (allocator_variant raises when the setting cannot apply). Each runs in its own child, so the check does too."""
    import os
    import subprocess

    code = (
        "import harness\n"
        "from alignkit.speedups import cpu\n"
        f"assert harness.allocator_variant({variant!r}) == {runs!r}\n"
        f"assert cpu.fit_cpu_allocator() is {alignkit_applies}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env.pop("ALIGNKIT_CPU_ALLOCATOR", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=BENCH, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    parser = _load("sft").harness.variant_parser("x", ["alignkit", "trl_defaults", "trl_tuned"])
    assert parser.parse_args(["--variants", "alignkit", variant]).variants == ["alignkit", variant]
    assert parser.parse_args([]).variants == ["alignkit", "trl_defaults", "trl_tuned"]  # opt-in only


def test_tool_sft_benchmark_prints_its_table(capsys):
    """Wiring only (tiny:llama, random weights): the generated tool rows validate and train through the SFT recipe
    in Qwen2.5's format, both models are asked with the tools and parsed by trl's parse_response."""
    rows = _load("tool_sft").main(["--size", "tiny", "--steps", "1", "--train_rows", "4", "--eval_rows", "2", "--max_new_tokens", "4"])  # fmt: skip
    assert len(rows) == 2 and all(0 <= r["well_formed"] <= 1 and r["right_call"] <= r["well_formed"] for r in rows)
    out = capsys.readouterr().out
    assert "well-formed call" in out and "chat format: qwen2_5" in out


def test_plan_check_prints_its_tables(capsys):
    """The planner's validation script: the GPU tables (published figures, sizing) and a tiny row's prediction (the
    measured rows need minutes: docs/planning.md)."""
    plan_check = _load("plan_check")
    plan_check.main(["--gpu"])
    out = capsys.readouterr().out
    assert "QLoRA paper" in out and "Llama-3.1-70B-Instruct" in out
    rows = plan_check.main(["--only", "tiny-sft-qlora-b4x128", "--predict_only"])
    assert rows[0]["config"] == "tiny-sft-qlora-b4x128" and rows[0]["predicted_mib"] > 0


@pytest.mark.parametrize("script", ["sft", "dpo"])
def test_gemma3_sizes_train_both_sides_in_4bit_and_gemmas_format(script, capsys):
    """``--size gemma3``'s settings on tiny:gemma3 (a model without a chat template): alignkit and plain trl both load
    the backbone in 4-bit and train the rows in Gemma's format, so their first losses (before any update; LoRA B
    starts at zero) are the same."""
    rows = _load(script).main(
        ["--size", "tiny_gemma3", "--steps", "2", "--repeats", "1", "--variants", "alignkit", "trl_tuned",
         *(["--gemm_n", "256", "--gemm_budget", "0.2"] if script == "sft" else [])],
        in_process=True,
    )  # fmt: skip
    assert [r["variant"] for r in rows] == ["alignkit", "trl_tuned"]
    for row in rows:
        assert row["frozen_params"] > 0 and row["quantized_params"] > 0  # Linear4bit layers on both sides
    first = [r["losses"][0] for r in rows]
    assert math.isclose(*first, rel_tol=1e-3), first
    assert "QLoRA (nf4) r16" in capsys.readouterr().out


def test_lm_head_bf16_benchmark_compares_the_two_precisions(capsys):
    (row,) = _load("lm_head_bf16").main(["--size", "tiny", "--repeats", "1"])
    assert row["tokens"] > 0 and 0 < row["token_abs"] < 0.1 and row["cosine"] > 0.99
    assert "fp32/bf16" in capsys.readouterr().out


def test_bf16_step_benchmark_times_the_variants_interleaved(capsys):
    """One tiny SFT step per variant (fp32, bf16 autocast as on main, with this branch's LoRA path), a shorter batch
    each step, then one profiled step per variant sorted into kinds; peft's own forward is back afterwards."""
    from peft.tuners.lora import layer as lora_layer

    forward = lora_layer.Linear.forward
    _load("bf16_step").main(["--size", "tiny", "--rounds", "1", "--variants", "fp32", "bf16_before", "bf16_lora",
                             "--vary", "3", "--profile", "--top", "3"])  # fmt: skip
    out = capsys.readouterr().out
    assert all(f"\n{v} " in out for v in ("fp32", "bf16_before", "bf16_lora")) and "shares: " in out
    assert lora_layer.Linear.forward is forward
