"""Builds the CUDA kernels of csrc/cuda/ for the CPU emulator, as one shared library.

Each .cu file is copied with three mechanical rewrites that plain C++ cannot express:

    kernel<<<grid, block, smem, stream>>>(args)    ->  ::emu::launch(kernel, grid, block, smem, stream, args)
    extern __shared__ __align__(16) T name[];      ->  T* name = reinterpret_cast<T*>(::emu::dynamic_shared_memory());
    __shared__ T a[N], b;                          ->  auto& a = ::emu::static_shared<T[N]>([] {}); auto& b = ...

(static_shared gives each declaration one object per kernel, which the emulator fills with
NaN bytes before every block: shared memory does not start as zeros, as a C++ static would).

and compiled by g++ with include/ ahead of csrc/cuda/ (so that ptx.cuh, cuda_runtime.h and
CUB's block scan are the emulator's) and include/emulator.h forced in first. Everything
else is the kernels' own code. Needs the CUDA toolkit's headers (cuda_fp16.h and friends),
found through CUDA_HOME (set by .ci/cuda_home.sh from nvcc); no GPU and no CUDA library.

    . .ci/cuda_home.sh && python tests/cuda_emulator/build_emulator.py    # prints the library's path
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
KERNELS = ROOT / "csrc" / "cuda"
BUILD = ROOT / "build" / "cuda_emulator"

LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[\w\s,:]*>)?)\s*<<<(.*?)>>>\(", re.DOTALL)
DYNAMIC_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w\s:]+?)\s+(\w+)\[\];")
DECLARATOR = r"\w+(?:\[[^\]]*\])*"  # name[dim][dim]...
STATIC_SHARED = re.compile(
    rf"__shared__\s+(?:__align__\(\d+\)\s+)?([\w:]+(?:\s+[\w:]+)*?)\s+({DECLARATOR}(?:\s*,\s*{DECLARATOR})*)\s*;"
)


def _static_shared(match: re.Match) -> str:
    element_type, declarators = match.group(1), match.group(2)
    return " ".join(
        f"auto& {name} = ::emu::static_shared<{element_type}{dims}>([] {{}});"
        for name, dims in re.findall(r"(\w+)((?:\[[^\]]*\])*)", declarators)
    )


def rewrite(source: str) -> str:
    source = LAUNCH.sub(lambda m: f"::emu::launch({m.group(1)}, {m.group(2)}, ", source)
    source = DYNAMIC_SHARED.sub(
        lambda m: f"{m.group(1)}* {m.group(2)} = reinterpret_cast<{m.group(1)}*>(::emu::dynamic_shared_memory());",
        source,
    )
    return STATIC_SHARED.sub(_static_shared, source)


def cuda_include_dir() -> Path:
    """The toolkit's include folder: $CUDA_HOME (`. .ci/cuda_home.sh` sets it from nvcc), else /usr/local/cuda."""
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and (Path(home) / "include" / "cuda_fp16.h").is_file():
            return Path(home) / "include"
    raise FileNotFoundError(
        "the CUDA emulator needs the CUDA toolkit's headers (cuda_fp16.h): set CUDA_HOME (`. .ci/cuda_home.sh`)"
    )


def sources() -> list[Path]:
    return sorted(KERNELS.glob("*.cu")) + [HERE / "emulator.cpp", HERE / "exports.cpp"]


def fingerprint(cuda_include: Path) -> str:
    """Hash of every input of the build, so a stale library is never reused."""
    digest = hashlib.sha256(str(cuda_include).encode())
    inputs = sources() + sorted(KERNELS.glob("*.cuh")) + sorted(KERNELS.glob("*.h")) + sorted(HERE.rglob("*.h"))
    inputs += sorted(HERE.rglob("*.cuh")) + [Path(__file__)]
    for path in inputs:
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def build() -> Path:
    """Compiles the library if its inputs changed; returns its path. Safe to call from several
    processes at once (pytest-xdist workers): one builds, the others wait for it."""
    cuda_include = cuda_include_dir()
    out_dir = BUILD / fingerprint(cuda_include)
    library = out_dir / "libcuda_emulated.so"
    if library.exists():
        return library
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not library.exists():
            _compile_and_link(cuda_include, out_dir, library)
    return library


def _compile_and_link(cuda_include: Path, out_dir: Path, library: Path) -> None:
    flags = [
        "-std=c++17", "-O1", "-g", "-fPIC", "-Wall", "-Wno-unused-function", "-Wno-unknown-pragmas",
        "-I", str(HERE / "include"), "-I", str(KERNELS), "-isystem", str(cuda_include),
        "-include", str(HERE / "include" / "emulator.h"),
    ]  # fmt: skip

    def compile_one(src: Path) -> Path:
        if src.suffix == ".cu":
            copy = out_dir / (src.stem + ".cpp")
            copy.write_text(f'#line 1 "{src}"\n' + rewrite(src.read_text()))
            src = copy
        obj = out_dir / (src.stem + ".o")
        result = subprocess.run(
            ["g++", *flags, "-c", str(src), "-o", str(obj)], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"g++ failed on {src}:\n{result.stderr}")
        if result.stderr:
            print(result.stderr, file=sys.stderr)
        return obj

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        objects = list(pool.map(compile_one, sources()))
    partial = library.with_suffix(".so.partial")
    # -Bsymbolic: the library's calls to its own cudaGetLastError & co. stay its own, even in a
    # process where torch has loaded the real CUDA runtime; -z defs: nothing is left for that
    # runtime (or anything else loaded later) to supply.
    link = ["g++", "-shared", "-Wl,-Bsymbolic", "-Wl,-z,defs", "-o", str(partial), *map(str, objects)]
    subprocess.run(link, check=True)
    partial.rename(library)  # a library that exists is complete


if __name__ == "__main__":
    print(build())
