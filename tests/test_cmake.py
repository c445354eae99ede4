"""The CMake build (CMakeLists.txt) of the op library against LibTorch, and its ctest that calls
the ops through the dispatcher from C++. Builds in a temporary folder. The CUDA sources join the
build only where a GPU can run them: without one, setup.py's build has already compiled them, and
compiling them again here would triple this test's time (minutes on two cores) to test nothing new."""

import os
import shutil
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_build_and_ctest(tmp_path):
    build = tmp_path / "build"
    use_cuda = torch.cuda.is_available() and shutil.which("nvcc") is not None
    configure = ["cmake", "-S", ROOT, "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                 f"-DTORCHEXT_CUDA={'ON' if use_cuda else 'OFF'}"]
    for cmd in (configure, ["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)],
                ["ctest", "--test-dir", str(build), "--output-on-failure"]):
        result = subprocess.run(cmd, capture_output=True, text=True)
        assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "100% tests passed" in result.stdout
    if use_cuda and shutil.which("nm") is not None:  # the wheel's Hopper GEMM is in this build too (sm_90a code)
        symbols = subprocess.run(["nm", "-C", "--defined-only", str(build / "libtorchext_ops.so")],
                                 capture_output=True, text=True, check=True).stdout
        assert "launch_qgemm_wgmma" in symbols
