"""How the op library was built and linked, and what that means for an error raised in it.

On the GPU machine (Ubuntu 24.04, GCC 13 behind /opt/gcc/bin/g++) the compiler driver found only
libstdc++.a, so the library carried its own copy of the C++ runtime; formatting any error message
in that copy segfaulted the process (torch 2.11, 2026-12-02). setup.py now links the shared
runtime explicitly when the driver would not; these tests hold both ends of that. Also here:
`python -m torchext.info`, which reports how the library was built and what it runs on.
"""

import struct
import subprocess
import sys

import pytest
import torch

import torchext

LIBRARY = torchext._C.__file__


def needed_libraries(path: str) -> list[str]:
    """The DT_NEEDED entries of a 64-bit little-endian ELF shared object."""
    with open(path, "rb") as f:
        elf = f.read()
    assert elf[:4] == b"\x7fELF" and elf[4] == 2 and elf[5] == 1, f"{path}: not a 64-bit little-endian ELF"
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", elf, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    names = []
    for _, sh_type, _, _, offset, size, link, _, _, _ in sections:
        if sh_type != 6:  # SHT_DYNAMIC
            continue
        strtab = sections[link][4]
        for tag, value in struct.iter_unpack("<qQ", elf[offset:offset + size]):
            if tag == 1:  # DT_NEEDED
                names.append(elf[strtab + value:elf.index(b"\0", strtab + value)].decode())
    return names


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF libraries on Linux only")
def test_library_links_the_shared_cxx_runtime():
    needed = needed_libraries(LIBRARY)
    assert any(name.startswith("libstdc++.so") for name in needed), (
        f"{LIBRARY} does not depend on libstdc++.so (it needs {needed}): a static copy of the C++ "
        "runtime was linked in, whose iostreams crash; see setup.py shared_libstdcxx_link_args")


def test_an_op_error_raises_in_a_fresh_process():
    """The first error of a process (nothing warmed up) reaches Python as a RuntimeError."""
    code = (
        "import torch, torchext\n"
        "w = torchext.quantize(torch.randn(4, 32), 'Q8_0')\n"
        "try:\n"
        "    torchext.embedding(w, 'Q8_0', torch.tensor([4]), 4, 32)\n"
        "except RuntimeError as e:\n"
        "    print('raised:', e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"exit code {result.returncode}\n{result.stderr[-2000:]}"
    assert "raised: ids: expected ids in [0, n=4), got 4" in result.stdout


def test_info_reports_the_library():
    """python -m torchext.info runs and names the devices the library has kernels for."""
    result = subprocess.run([sys.executable, "-m", "torchext.info"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    has_cuda = torch.ops.torchext.qmatmul.default.has_kernel_for_dispatch_key("CUDA")
    assert f"kernels registered for: CPU{', CUDA' if has_cuda else ''}\n" in result.stdout, result.stdout
    assert result.stderr == "", result.stderr[-2000:]


@pytest.mark.parametrize("capability, targets, expected", [
    ((9, 0), ["sm_90", "compute_90"], "sm_90 machine code"),
    ((8, 6), ["sm_80", "compute_90"], "sm_80 machine code"),  # a cubin runs on later minors
    ((8, 6), ["sm_80a"], "no code"),  # an arch-specific cubin runs on its own capability only
    ((12, 0), ["sm_90", "compute_90"], "compute_90 PTX"),  # PTX runs on every later GPU
    ((8, 0), ["sm_90", "compute_90"], "no code"),
])
def test_info_matches_gpu_and_library_code(capability, targets, expected):
    from torchext.info import gpu_code
    assert expected in gpu_code(capability, targets)
