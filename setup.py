"""Builds torchext._C: the op library, with CUDA kernels when nvcc and a CUDA build of torch are present.

The package's metadata and dependencies are in pyproject.toml; this file builds the extension.
The library uses only PyTorch's stable ABI (TORCH_TARGET_VERSION 2.11) and the limited Python API,
so one build loads on every torch >= 2.11 and every CPython >= 3.10.
Environment: TORCHEXT_CUDA=0 forces a CPU-only build; TORCH_CUDA_ARCH_LIST picks GPU
architectures (default: the visible GPU's, else 9.0 with PTX for newer GPUs).
The build records what it built in torchext/_build_info.py (read by `python -m torchext.info`)
and prints the same line; pip shows it with -v.
"""

import os
import re
import shutil
import subprocess
import sys
import time

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def read_sources(kind):
    """csrc/sources.txt: the one source list that setup.py and CMakeLists.txt share."""
    with open(os.path.join(ROOT, "csrc", "sources.txt")) as f:
        rows = [line.split() for line in f if line.strip() and not line.startswith("#")]
    return [path for k, path in rows if k == kind]


CPU_SOURCES = read_sources("cpu")
CUDA_SOURCES = read_sources("cuda")
SM90A_SOURCES = read_sources("cuda_sm90a")

TORCH_TARGET_VERSION = "0x020b000000000000"  # 2.11: the oldest torch this build must load on


def _has_toolkit(path):
    return bool(path) and os.path.isfile(os.path.join(path, "include", "cuda_runtime.h"))


def find_cuda_home():
    """The CUDA toolkit that `nvcc` belongs to, even when `nvcc` on PATH is a wrapper script."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if _has_toolkit(os.environ.get(var)):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    guess = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if _has_toolkit(guess):
        return guess
    try:  # a wrapper: ask the real nvcc where its toolkit is ("#$ TOP=/usr/local/cuda-13.0/bin/..")
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        m = re.search(r"TOP=(\S+)", out.stdout + out.stderr)
        if m and _has_toolkit(os.path.normpath(m.group(1))):
            return os.path.normpath(m.group(1))
    except (OSError, subprocess.SubprocessError):
        pass
    return "/usr/local/cuda" if _has_toolkit("/usr/local/cuda") else None


CUDA_HOME = find_cuda_home()
if CUDA_HOME:
    os.environ["CUDA_HOME"] = CUDA_HOME  # read by torch.utils.cpp_extension at import

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

USE_CUDA = os.environ.get("TORCHEXT_CUDA", "1") != "0" and torch.version.cuda is not None and CUDA_HOME is not None
if USE_CUDA and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
    os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0+PTX"  # no GPU to ask: Hopper, plus PTX for newer GPUs


def builds_sm90a():
    """Whether the build targets compute capability 9.0, and so builds the cuda_sm90a sources (Hopper's
    wgmma and setmaxnreg exist only in sm_90a code, which no other GPU loads). They are compiled by
    their own nvcc command (start_sm90a_objects), not by BuildExtension's: its flags are the same for every
    source, and adding sm_90a to them would compile every kernel twice."""
    if not USE_CUDA or not SM90A_SOURCES:
        return False
    from torch.utils.cpp_extension import _get_cuda_arch_flags

    return any(re.search(r"code=(sm|compute)_90\b", flag) for flag in _get_cuda_arch_flags())


def extra_include_dirs():
    dirs = [ROOT]
    # torch's CUDA wheel ships the CUDA headers that a minimal toolkit may lack
    for site in sys.path:
        cand = os.path.join(site, "nvidia", "cu13", "include")
        if os.path.isdir(cand):
            dirs.append(cand)
            break
    return dirs


def loaded_libstdcxx():
    """The libstdc++.so.6 this process (and so torch) runs on, from /proc/self/maps; None elsewhere."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if os.path.basename(path).startswith("libstdc++.so"):
                    return path
    except OSError:
        pass
    return None


def shared_libstdcxx_link_args():
    """Link flags that make libstdc++ a shared dependency of the library.

    A compiler driver that finds only libstdc++.a (the GPU machine's /opt/gcc/bin/g++, GCC 13, whose
    -B folder has the archive but no libstdc++.so) links a private copy of the C++ runtime into the
    library. That copy's iostreams were never initialised: every error message (ostringstream <<
    int) segfaulted the process, whatever the torch version. Then link the runtime torch already
    loaded, by its file name; tests/test_build.py checks the result.
    """
    cxx = os.environ.get("CXX", "c++")
    try:
        found = subprocess.run([cxx, "-print-file-name=libstdc++.so"], capture_output=True, text=True,
                               timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return []
    runtime = loaded_libstdcxx()
    if os.path.isabs(found) or runtime is None:  # the driver links the shared runtime by itself
        return []
    return [f"-L{os.path.dirname(runtime)}", f"-l:{os.path.basename(runtime)}"]


def nvcc_flags():
    """nvcc's flags for every CUDA source, the sm_90a ones (start_sm90a_objects) included."""
    return ["-O3", "-std=c++17", "-DUSE_CUDA", "--expt-relaxed-constexpr", "-lineinfo",
            f"-DTORCH_TARGET_VERSION={TORCH_TARGET_VERSION}"]


def make_extension():
    defines = [f"-DTORCH_TARGET_VERSION={TORCH_TARGET_VERSION}"]
    cxx = ["-O3", "-std=c++17", "-ffp-contract=off", *defines]
    kwargs = dict(name="torchext._C", include_dirs=extra_include_dirs(), py_limited_api=True,
                  extra_link_args=shared_libstdcxx_link_args())
    if not USE_CUDA:
        return CppExtension(sources=CPU_SOURCES, extra_compile_args={"cxx": cxx}, **kwargs)
    nvcc = nvcc_flags()
    if builds_sm90a():
        nvcc.append("-DTORCHEXT_WGMMA")
    return CUDAExtension(
        sources=CPU_SOURCES + CUDA_SOURCES,
        extra_compile_args={"cxx": cxx + ["-DUSE_CUDA"], "nvcc": nvcc},
        **kwargs,
    )


def cuda_summary() -> tuple[str, list[str]]:
    """(a line saying whether and for what the CUDA kernels are built, the nvcc targets: sm_XY
    for machine code, compute_XY for PTX that newer GPUs compile at load time)."""
    if not USE_CUDA:
        why = ("TORCHEXT_CUDA=0" if os.environ.get("TORCHEXT_CUDA", "1") == "0"
               else "torch is a CPU build" if torch.version.cuda is None else "no CUDA toolkit (nvcc) found")
        return f"CUDA kernels: no ({why})", []
    # the flags BuildExtension passes to nvcc, from TORCH_CUDA_ARCH_LIST or the visible GPUs
    from torch.utils.cpp_extension import _get_cuda_arch_flags

    targets = [m.group(1) for flag in _get_cuda_arch_flags() if (m := re.search(r",code=(\w+)", flag))]
    targets.sort(key=lambda t: (t.startswith("compute_"), int(re.sub(r"\D", "", t))))  # sm_80, sm_90, compute_90
    return f"CUDA kernels: yes, for {', '.join(targets)} (CUDA {torch.version.cuda}, toolkit {CUDA_HOME})", targets


def start_sm90a_objects(build_temp):
    """Starts nvcc on each cuda_sm90a source whose object in build_temp is older than it or than a
    header under kernels/; returns (the objects, for the extension's link; the running nvcc
    processes). They compile while BuildExtension's ninja compiles the other sources: run before it,
    the wgmma source alone took 2 of a 7.7-minute build on 2 cores."""
    headers = [os.path.join(ROOT, "kernels", f) for f in os.listdir(os.path.join(ROOT, "kernels"))
               if f.endswith((".h", ".cuh"))]
    newest_header = max(os.path.getmtime(h) for h in headers)
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
    objects, running = [], []
    for source in SM90A_SOURCES:
        obj = os.path.join(build_temp, "sm90a", os.path.splitext(source)[0] + ".o")
        src = os.path.join(ROOT, source)
        if not os.path.exists(obj) or os.path.getmtime(obj) < max(os.path.getmtime(src), newest_header):
            os.makedirs(os.path.dirname(obj), exist_ok=True)
            cmd = [nvcc, "-c", src, "-o", obj, *nvcc_flags(), "-DTORCHEXT_WGMMA", "-Xcompiler", "-fPIC",
                   "-gencode", "arch=compute_90a,code=sm_90a", *[f"-I{d}" for d in extra_include_dirs()]]
            print(" ".join(cmd), flush=True)
            running.append(subprocess.Popen(cmd))
        objects.append(obj)
    return objects, running


def finish(running, stop: bool = False):
    """Waits for the processes of start_sm90a_objects (stop: ends them first); raises if one failed."""
    for process in running:
        if stop:
            process.terminate()
        if process.wait() != 0 and not stop:
            raise subprocess.CalledProcessError(process.returncode, process.args)


class TimedBuild(BuildExtension):
    """build_ext that builds the cuda_sm90a sources beside the others and writes
    torchext/_build_info.py beside the library, printing its line."""

    def build_extension(self, ext):
        if not builds_sm90a():
            return super().build_extension(ext)
        objects, running = start_sm90a_objects(self.build_temp)
        ext.extra_objects = list(ext.extra_objects or []) + objects
        link = self.compiler.link_shared_object

        def link_after_sm90a(*args, **kwargs):
            finish(running)
            return link(*args, **kwargs)

        self.compiler.link_shared_object = link_after_sm90a
        try:
            super().build_extension(ext)
        except BaseException:
            finish(running, stop=True)
            raise
        finally:
            self.compiler.link_shared_object = link

    def run(self):
        start = time.time()
        super().run()
        cuda, targets = cuda_summary()
        line = f"built in {time.time() - start:.1f} s against torch {torch.__version__}; {cuda}"
        info = (f'"""What setup.py built; written at build time, not in git (python -m torchext.info reads it)."""\n'
                f"SUMMARY = {line!r}\nTORCH_VERSION = {torch.__version__!r}\nCUDA = {USE_CUDA!r}\n"
                f"CUDA_TARGETS = {targets!r}\n")
        # the wheel takes build_lib's copy; an editable (in-place) build imports the source folder's
        folders = [os.path.join(self.build_lib, "torchext")]
        if self.inplace:
            folders.append(os.path.join(ROOT, "torchext"))
        for folder in folders:
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, "_build_info.py"), "w") as f:
                f.write(info)
        print(f"torchext: {line}", flush=True)


setup(
    ext_modules=[make_extension()],
    cmdclass={"build_ext": TimedBuild.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
