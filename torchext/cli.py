"""Command-line argument types and defaults shared by torchext's entry points (the demo, the report) and
the scripts in examples/ and bench/: a bad value is a usage error naming the argument, not a traceback from
the code that meets it later."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .gguf_file import GGUFFile


def int_at_least(minimum: int, why: str = ""):
    """An argparse type: an integer >= minimum (a usage error naming the argument, not a traceback from the
    code that meets the number later); `why` says why the minimum, in the message."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"expected at least {minimum}, got {n}" + (f": {why}" if why else ""))
        return n
    return parse


def shape_arg(text: str) -> tuple[int, int]:
    """An argparse type: a weight shape NxK of positive integers, as (n, k)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(f"expected NxK with positive integers (4096x4096), got {text!r}")
    return int(parts[0]), int(parts[1])


def gguf_file_arg(text: str) -> Path:
    """--gguf: the path of an existing file whose GGUF tables read (argparse reports the ArgumentTypeError as a
    usage error; a missing path or a directory raised a traceback from deep in the reader, and gguf's own
    reader says only "GGUF magic invalid" of a file that is not GGUF)."""
    if not text:
        raise argparse.ArgumentTypeError("expected the path of a GGUF file, got an empty string")
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: expected a GGUF file, got a directory" if path.is_dir()
                                         else f"{text}: expected a GGUF file, got something else")
    try:
        with GGUFFile(path):  # its ValueError names the file and what is malformed
            pass
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    except OSError as e:  # unreadable (permissions), or a read that failed
        raise argparse.ArgumentTypeError(f"{text}: cannot read it ({e.strerror or e})") from None
    return path


def library_has_cuda_kernels() -> bool:
    """Whether the op library was built with its CUDA kernels (TORCHEXT_CUDA=0 builds the CPU ones alone)."""
    return torch.ops.torchext.qmatmul.default.has_kernel_for_dispatch_key("CUDA")


def default_device() -> str:
    """cuda where a GPU is visible and the op library has CUDA kernels, else cpu: a CPU-only build
    (TORCHEXT_CUDA=0) on a GPU machine runs on the CPU, as python -m torchext.info says it does."""
    return "cuda" if library_has_cuda_kernels() and torch.cuda.is_available() else "cpu"


def device_arg(text: str) -> torch.device:
    """--device: cpu or cuda[:index], a CUDA device only where one is visible (argparse reports the
    ArgumentTypeError as a usage error, where torch.device or the first CUDA call raised a traceback)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:INDEX, got {text!r}") from None
    if device.type not in ("cpu", "cuda"):  # the op library has kernels for these two alone
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:INDEX, got {text!r}")
    if device.type == "cpu":
        from . import _C

        try:  # TORCHEXT_CPU_KERNELS naming no kernel set, or one this CPU lacks: every op raises it (a traceback)
            _C.cpu_kernels()
        except RuntimeError as e:
            raise argparse.ArgumentTypeError(f"{text}: {e}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text}: no CUDA device is visible (use --device cpu)")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text}: only {count} CUDA device(s) are visible")
        if not library_has_cuda_kernels():
            raise argparse.ArgumentTypeError(f"{text}: the op library was built without CUDA kernels (python -m "
                                             "torchext.info says how it was built; use --device cpu)")
    return device
