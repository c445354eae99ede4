"""What this torchext is and what it can run on: `python -m torchext.info`.

Prints torch's version and build, the op library and the line its build printed (whether the
CUDA kernels are in, and for which GPU architectures), the devices the ops have kernels for, the
CPU, and each visible GPU with the library code that runs on it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import sys

import torch

from . import _C


def gpu_code(capability: tuple[int, int], targets: list[str]) -> str:
    """Which of the library's nvcc targets runs on a GPU of `capability` (major, minor): machine
    code sm_XY runs on compute capability X.Y and later minors of X (sm_XYa on X.Y alone); PTX
    compute_XY is compiled by the driver, at first use, for XY and every later GPU."""
    major, minor = capability
    sm = major * 10 + minor
    native, ptx = [], []
    for t in targets:
        if m := re.fullmatch(r"sm_(\d+)(a?)", t):
            c = int(m[1])
            if c == sm or (not m[2] and c // 10 == major and c <= sm):
                native.append((c, t))
        elif (m := re.fullmatch(r"compute_(\d+)", t)) and int(m[1]) <= sm:
            ptx.append((int(m[1]), t))
    if native:
        return f"runs its {max(native)[1]} machine code"
    if ptx:
        return f"runs its {max(ptx)[1]} PTX, which the driver compiles at first use"
    return ("no code for it: the CUDA ops fail there; rebuild with TORCH_CUDA_ARCH_LIST="
            f"{major}.{minor} (or on a machine with this GPU)")


def main(argv=None) -> int:
    """Print the report (argv, default sys.argv[1:], takes only --help); 0 as the exit status."""
    # a parser of no options: --help printed the report, and a misspelt option was ignored
    argparse.ArgumentParser(prog="python -m torchext.info", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    try:
        version = importlib.metadata.version("torchext")
    except importlib.metadata.PackageNotFoundError:
        version = "(not installed: imported from the path)"
    cuda = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
    print(f"torch {torch.__version__} ({cuda}), Python {sys.version.split()[0]}")
    print(f"torchext {version}: {os.path.dirname(os.path.abspath(__file__))}")
    print(f"op library: {_C.__file__}")
    try:
        from . import _build_info as build
    except ImportError:  # a library built by CMake, or by a setup.py older than the record
        build = None
        print("  built: no record (setup.py writes torchext/_build_info.py when it builds the library)")
    else:
        print(f"  {build.SUMMARY}")
    op = torch.ops.torchext.qmatmul.default
    keys = [key for key in ("CPU", "CUDA") if op.has_kernel_for_dispatch_key(key)]
    print(f"  kernels registered for: {', '.join(keys)}")
    try:
        kernels = f"torchext's GEMVs run its {_C.cpu_kernels()} kernels"
    except RuntimeError as e:  # TORCHEXT_CPU_KERNELS names no set, or one this CPU lacks: the ops will raise this
        kernels = f"torchext's kernels: {e}"
    print(f"CPU: {torch.get_num_threads()} threads (torch.get_num_threads); {kernels}; torch's own ops run its "
          f"{torch.backends.cpu.get_cpu_capability()} kernels")
    if not torch.cuda.is_available():
        print("GPU: none visible, so the ops run on the CPU")
    for i in range(torch.cuda.device_count()):
        cap = torch.cuda.get_device_capability(i)
        if "CUDA" not in keys:
            code = "the library has no CUDA kernels: the ops run on the CPU only"
        elif build is None:
            code = "the library's architectures are not recorded"
        else:
            code = gpu_code(cap, build.CUDA_TARGETS)
        print(f"GPU {i}: {torch.cuda.get_device_name(i)}, compute capability {cap[0]}.{cap[1]}: {code}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
