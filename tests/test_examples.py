"""Every script in examples/ runs as its docstring says, in a fresh interpreter, with small sizes:
a user's first contact with the package must not fail. The Gemma 3 run skips without the gemma
extra; the small-file run of the same script covers the GGUF path everywhere."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import skip_without_gemma_gguf

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

# (script, arguments, a line its output must contain)
CASES = [
    ("quantized_mlp.py", [], "gradients reach"),
    ("gguf_generate.py", ["--tiny"], "blk.0.ffn_down.weight (Q8_0)"),
    ("gguf_generate.py", ["--tokens", "4"], "tokens in"),
    ("bench_layer.py", ["--n", "256", "--k", "512", "--batches", "1", "17", "--reps", "3"], "speed-up"),
    ("hf_generate.py", ["--tiny"], "QuantLinear layers"),
    ("hf_generate.py", ["--tokens", "4"], "tokens in"),
]


def run_script(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("script, args, expected", CASES, ids=[f"{s}{''.join(a[:1])}" for s, a, _ in CASES])
def test_example_runs(script, args, expected, tmp_path):
    if script in ("gguf_generate.py", "hf_generate.py") and "--tiny" not in args:
        skip_without_gemma_gguf()
    result = run_script(script, args, tmp_path)
    assert result.returncode == 0, (f"{script} {' '.join(args)} failed:\n"
                                    f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    assert expected in result.stdout, result.stdout[-3000:]
    # warnings only when something is wrong: a clean run prints nothing on stderr
    assert result.stderr == "", result.stderr[-3000:]


def test_every_example_is_run():
    assert {p.name for p in EXAMPLES.glob("*.py")} == {script for script, _, _ in CASES}


@pytest.mark.parametrize("args, message", [(["--reps", "0"], "--reps: expected at least 1, got 0"),
                                           (["--batches", "1", "0"], "--batches: expected sizes of at least 1"),
                                           (["--n", "-4"], "--n: expected at least 1, got -4"),
                                           (["--k", "100", "--format", "Q8_0"],
                                            "--k: Q8_0 rows are whole 32-value blocks, so --k must be a multiple "
                                            "of 32, got 100")])
def test_bench_layer_refuses_sizes_it_cannot_time(args, message, tmp_path):
    result = run_script("bench_layer.py", args, tmp_path)  # --reps 0 once died taking the median of nothing
    assert result.returncode == 2 and message in result.stderr, result.stderr[-3000:]


@pytest.mark.parametrize("tokens", ["1", "0", "-3"])
def test_demo_refuses_too_few_tokens_to_time_decoding(tokens, capsys):
    """torchext.demo times decoding over tokens 2..n (the first comes from the prompt pass): fewer than
    2 once divided by a zero speed (--tokens 1) or printed a negative one (--tokens 0). argparse
    refuses them before anything loads, so no model file is needed."""
    from torchext import demo

    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--tokens", tokens])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --tokens: expected at least 2, got {tokens}: the first token comes from the prompt pass" in err
