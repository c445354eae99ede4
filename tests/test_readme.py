"""Every ```python block of README.md runs as written, each in a fresh interpreter (on the CPU when
there is no GPU), from a folder that holds a small model.gguf for the blocks that open that file
(written here with gguf.GGUFWriter). Blocks that use the Gemma 3 270M file (gguf_path()) skip
without the gemma extra."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch
from conftest import skip_without_gemma_gguf

import torchext

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def python_blocks(text: str) -> list[tuple[str, str]]:
    """(the heading above it, its code) for every ```python block of a markdown text."""
    blocks, heading, fence, code = [], "top", None, []
    for line in text.splitlines(keepends=True):
        if fence is None and line.startswith("```"):
            fence, code = line.strip()[3:], []
        elif fence is not None and line.strip() == "```":
            if fence == "python":
                blocks.append((heading, "".join(code)))
            fence = None
        elif fence is not None:
            code.append(line)
        elif line.startswith("#"):
            heading = line.lstrip("#").strip()
    return blocks


BLOCKS = python_blocks(README)

# torch's advice on a GPU the first time inductor compiles a float32 matmul without TF32 (a cached
# compile skips it): about torch's settings, not a fault, so it may appear
TF32_HINT = re.compile(r"[^\n]*UserWarning: TensorFloat32 tensor cores for float32 matrix multiplication "
                       r"available but not enabled[^\n]*\n\s*warnings\.warn\(\n")


def write_model_gguf(path: Path) -> None:
    """The GGUF file the README calls model.gguf: blk.0.ffn_up.weight, a Q4_K [1024, 512] weight."""
    writer = gguf.GGUFWriter(str(path), "llama")
    raw = torchext.quantize(torch.randn(1024, 512) * 0.05, "Q4_K").numpy()
    writer.add_tensor("blk.0.ffn_up.weight", raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType.Q4_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_readme_has_its_python_blocks():
    assert [heading for heading, _ in BLOCKS] == ["In model code", "With Hugging Face transformers and peft",
                                                 "With diffusers", "Gemma 3 270M, end to end"]


@pytest.mark.parametrize("heading, code", BLOCKS, ids=[heading for heading, _ in BLOCKS])
def test_readme_block_runs(heading, code, tmp_path):
    if "gguf_path()" in code:
        skip_without_gemma_gguf()
    # a block about an optional integration (transformers, diffusers) needs that package; CI installs them
    missing = [m for m in re.findall(r"^(?:from|import) (\w+)", code, re.M) if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    write_model_gguf(tmp_path / "model.gguf")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"README block under {heading!r} failed:\n{result.stderr[-3000:]}"
    # warnings only when something is wrong: a clean run prints nothing else on stderr
    stderr = TF32_HINT.sub("", result.stderr)
    assert stderr == "", stderr[-3000:]
