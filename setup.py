"""Builds pyminigpt._C: the C++ CPU kernels always, the CUDA kernels when possible.

CPU: every csrc/cpu/<op>.cpp is compiled three times -- for the DEFAULT, AVX2 and AVX512
instruction sets, each with its CPU_CAPABILITY defines so that at::vec::Vectorized really
uses those registers -- and csrc/cpu_ops.cpp picks one at run time. Never -march=native:
the result must run on any x86-64 CPU. $CFLAGS is added to these commands, as setuptools
adds it to the binding's (.ci/sanitize_cpu.sh builds with AddressSanitizer that way).

CUDA: built when torch was built with CUDA and a CUDA toolkit is found, or when
PYMINIGPT_BUILD_CUDA=1 forces it (PYMINIGPT_BUILD_CUDA=0 turns it off). Architectures come
from TORCH_CUDA_ARCH_LIST (default "8.0;9.0"), never from the GPU at hand.

Install against the torch you have: pip install --no-build-isolation .
"""

import glob
import hashlib
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension, include_paths

CPU_KERNEL_SOURCES = sorted(glob.glob("csrc/cpu/*.cpp"))
CPU_KERNEL_HEADERS = sorted(glob.glob("csrc/cpu/*.h"))


def read_compile_flags(path: str = "csrc/compile_flags.txt") -> dict:
    """NAME -> flags, from the file that CMakeLists.txt reads too."""
    flags = {}
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                name, _, value = line.partition(":")
                flags[name.strip()] = value.split()
    return flags


COMPILE_FLAGS = read_compile_flags()
CPU_CAPABILITY_FLAGS = {name: COMPILE_FLAGS[name] for name in ("DEFAULT", "AVX2", "AVX512")}
# -std right after -O3: the kernels' command lines as they were before this file, so that ccache hits
CXX = [*COMPILE_FLAGS["CXX"][:1], f"-std=c++{COMPILE_FLAGS['CXX_STANDARD'][0]}", *COMPILE_FLAGS["CXX"][1:]]
NVCC = [f"-std=c++{COMPILE_FLAGS['CUDA_STANDARD'][0]}", *COMPILE_FLAGS["NVCC"]]
CXX_FLAGS = CXX


def want_cuda() -> bool:
    forced = os.environ.get("PYMINIGPT_BUILD_CUDA")
    if forced is not None:
        return forced == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None


class BuildWithCpuCapabilities(BuildExtension):
    """BuildExtension that first compiles the CPU kernels once per instruction set."""

    def build_extensions(self):
        objects = self.compile_cpu_kernels()
        for ext in self.extensions:
            ext.extra_objects = list(ext.extra_objects or []) + objects
        super().build_extensions()

    def compile_cpu_kernels(self) -> list:
        abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
        includes = [f"-I{path}" for path in include_paths()]
        compiler = os.environ.get("CXX", "c++")
        extra_flags = shlex.split(os.environ.get("CFLAGS", ""))
        # One object folder per compiler, flags and $CFLAGS: pip builds in the source tree's build/, and
        # the up-to-date check below looks at times only, so a sanitized build must not pick up
        # the objects of a plain one (or the reverse).
        # (the flags of csrc/compile_flags.txt are part of the key: changing them rebuilds)
        flags_key = hashlib.sha1(" ".join([compiler, *extra_flags, *CXX_FLAGS]).encode()).hexdigest()[:12]
        out_dir = os.path.join(self.build_temp, f"cpu_kernels-{flags_key}")
        os.makedirs(out_dir, exist_ok=True)
        jobs = []
        for capability, isa_flags in CPU_CAPABILITY_FLAGS.items():
            for source in CPU_KERNEL_SOURCES:
                name = os.path.splitext(os.path.basename(source))[0]
                obj = os.path.join(out_dir, f"{name}.{capability}.o")
                defines = [f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}"]
                flags = [abi, *CXX_FLAGS, *isa_flags, *defines, *includes, *extra_flags]
                command = [compiler, "-c", source, "-o", obj, *flags]
                jobs.append((source, obj, command))
        stale = [job for job in jobs if self.force or not is_up_to_date(job[1], [job[0], *CPU_KERNEL_HEADERS])]
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            list(pool.map(run_compiler, stale))
        return [obj for _, obj, _ in jobs]


def run_compiler(job) -> None:
    source, obj, command = job
    print(f"compiling {source} -> {obj}", flush=True)
    result = subprocess.run(command, check=False, capture_output=True, text=True)
    sys.stdout.write(result.stdout + result.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"compiling {source} failed:\n{' '.join(command)}")


def is_up_to_date(target: str, sources: list) -> bool:
    return os.path.exists(target) and all(os.path.getmtime(target) >= os.path.getmtime(s) for s in sources)


def extension():
    sources = ["csrc/ops.cpp", "csrc/cpu_ops.cpp"]
    cxx = CXX
    if want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += ["csrc/cuda_ops.cpp", *sorted(glob.glob("csrc/cuda/*.cu"))]
        return CUDAExtension(
            "pyminigpt._C",
            sources,
            include_dirs=[os.path.abspath("csrc")],
            extra_compile_args={"cxx": cxx + ["-DPYMINIGPT_WITH_CUDA"], "nvcc": NVCC},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension("pyminigpt._C", sources, extra_compile_args=cxx, extra_link_args=["-fopenmp"])


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildWithCpuCapabilities.with_options(use_ninja=True)})
