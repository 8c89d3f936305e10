"""llama.cpp's command-line tools, built natively from the llama-cpp-python sdist, as the benchmark peer.

The llama.cpp source comes from the llama-cpp-python sdist on PyPI (it vendors llama.cpp under
vendor/llama.cpp), so the peer is pinned by one version number and needs nothing but PyPI. The tools
are built once into a cache folder and reused:

    <cache>/src/      the unpacked sdist
    <cache>/build/    the CMake build; tools land in <cache>/build/bin/

with <cache> = ~/.cache/pyengine/llama.cpp-<version>/ unless LLAMA_CPP_BIN names an existing bin
folder (then nothing is built). CMake flags: -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF
-DCMAKE_BUILD_TYPE=Release, plus LLAMA_OPENSSL=OFF, LLAMA_USE_PREBUILT_UI=OFF (llama-server's web UI
would otherwise be downloaded at build time) and no tests/examples. Only the targets in TOOLS are built.

AMX: wherever the CPU reports `amx_tile`, the build uses -DGGML_NATIVE=OFF and turns on
AVX/AVX2/FMA/F16C/BMI2 and the AVX-512 subsets the CPU reports (F, VBMI, VNNI, BF16) one by one, so
llama.cpp runs its AVX-512 VNNI kernels (pyengine runs its own, with AMX tiles for Q4_0/Q8_0 prefill). A
native build picks llama.cpp's AMX path, which fails two ways on the VMs seen so far: where the kernel
refuses the tile state (arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) fails) it dies with SIGILL, and on
an Intel Xeon whose kernel allows it (2026-11-27) llama-bench 0.3.36 dies with a general protection
fault on its own LDTILECFG in ggml_backend_amx_mul_mat, on every model tried.
`python benchmarks/llama_cpp_tools.py --flags` prints what would be used on this machine.

AVX2-only (`--avx2-only`, into <cache>/build-avx2/): -DGGML_NATIVE=OFF with AVX/AVX2/FMA/F16C/BMI2 on
and AVX-512 off, the llama.cpp an AVX2 CPU (AMD Zen 3, Intel before Ice Lake) runs: on a CPU with
AVX-512 it is the peer for pyengine's AVX2 kernels (PYENGINE_CPU=avx2), with LLAMA_CPP_BIN set to its
bin folder.

    python benchmarks/llama_cpp_tools.py --build        # build every tool in TOOLS
    python benchmarks/llama_cpp_tools.py --path llama-bench
    python benchmarks/llama_cpp_tools.py --build --avx2-only   # prints the bin folder
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

VERSION = "0.3.36"
TOOLS = ("llama-bench", "llama-batched-bench", "llama-server", "llama-perplexity", "llama-quantize", "llama-cli",
         "llama-embedding", "llama-imatrix")

BASE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
              "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=ON"]  # examples: llama-embedding
# (cpuinfo flag, ggml option) for the explicit build used when AMX is advertised but unusable
ISA_FLAGS = [("avx", "GGML_AVX"), ("avx2", "GGML_AVX2"), ("fma", "GGML_FMA"), ("f16c", "GGML_F16C"),
             ("bmi2", "GGML_BMI2"), ("avx512f", "GGML_AVX512"), ("avx512vbmi", "GGML_AVX512_VBMI"),
             ("avx512_vnni", "GGML_AVX512_VNNI"), ("avx512_bf16", "GGML_AVX512_BF16")]


def _log(msg: str) -> None:
    print(f"[llama.cpp {VERSION}] {msg}", file=sys.stderr, flush=True)


def cache_dir(version: str = VERSION) -> Path:
    return Path.home() / ".cache" / "pyengine" / f"llama.cpp-{version}"


def bin_dir(cache: Path | None = None) -> Path:
    """The folder the tools are in: $LLAMA_CPP_BIN if set, else <cache>/build/bin."""
    env = os.environ.get("LLAMA_CPP_BIN")
    if env:
        if not Path(env).is_dir():
            raise FileNotFoundError(f"LLAMA_CPP_BIN={env} is not a folder")
        return Path(env)
    return (cache or cache_dir()) / "build" / "bin"


def cpu_flags() -> set[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


AVX2_ONLY_FLAGS = ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
                   "-DGGML_BMI2=ON", "-DGGML_AVX512=OFF", "-DGGML_AVX_VNNI=OFF"]


def cmake_flags(avx2_only: bool = False) -> list[str]:
    if avx2_only:
        return BASE_FLAGS + AVX2_ONLY_FLAGS
    flags = cpu_flags()
    if "amx_tile" in flags:  # see the module docstring
        isa = [f"-D{opt}={'ON' if f in flags else 'OFF'}" for f, opt in ISA_FLAGS]
        return BASE_FLAGS + ["-DGGML_NATIVE=OFF"] + isa
    return BASE_FLAGS + ["-DGGML_NATIVE=ON"]


def source_dir(cache: Path) -> Path:
    """vendor/llama.cpp of the unpacked sdist, downloading it with pip the first time."""
    src = cache / "src" / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    if (src / "CMakeLists.txt").is_file():
        return src
    sdist = cache / "sdist" / f"llama_cpp_python-{VERSION}.tar.gz"
    if not sdist.is_file():
        _log(f"downloading the llama-cpp-python {VERSION} sdist")
        # --no-build-isolation: pip still prepares metadata for an sdist; without isolation it skips
        # installing scikit-build-core and cmake into a throwaway environment first.
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "--no-build-isolation", f"llama-cpp-python=={VERSION}", "-d", str(sdist.parent)], check=True)
    _log(f"unpacking {sdist.name}")
    with tarfile.open(sdist) as tar:
        tar.extractall(cache / "src", filter="data")
    return src


def available_tools(src: Path) -> list[str]:
    """The names in TOOLS that this llama.cpp version defines as CMake targets."""
    defined = set()
    for cm in [*src.glob("tools/*/CMakeLists.txt"), *src.glob("examples/*/CMakeLists.txt")]:
        for line in cm.read_text(errors="replace").splitlines():
            line = line.strip()
            if line.startswith("set(TARGET "):
                defined.add(line.removeprefix("set(TARGET ").rstrip(")").strip())
    return [t for t in TOOLS if t in defined]


def build(targets: list[str] | None = None, cache: Path | None = None, jobs: int | None = None,
          avx2_only: bool = False) -> Path:
    """Configure (once) and build `targets` (default: every tool in TOOLS that exists); returns the bin folder."""
    cache = cache or cache_dir()
    src = source_dir(cache)
    build_dir = cache / ("build-avx2" if avx2_only else "build")
    targets = targets or available_tools(src)
    t0 = time.perf_counter()
    if not (build_dir / "CMakeCache.txt").is_file():
        gen = ["-G", "Ninja"] if shutil.which("ninja") else []
        flags = cmake_flags(avx2_only)
        _log(f"configuring: cmake {' '.join(flags)}")
        subprocess.run(["cmake", "-S", str(src), "-B", str(build_dir), *gen, *flags], check=True,
                       stdout=sys.stderr)
    jobs = jobs or os.cpu_count() or 1
    _log(f"building {', '.join(targets)} with {jobs} jobs in {build_dir} (takes a while)")
    subprocess.run(["cmake", "--build", str(build_dir), "--config", "Release", "-j", str(jobs),
                    "--target", *targets], check=True, stdout=sys.stderr)
    _log(f"built in {time.perf_counter() - t0:.0f} s")
    return build_dir / "bin"


def build_info(bin_folder: Path | None = None) -> dict:
    """How the tools in `bin_folder` (default: bin_dir()) were built, from the CMakeCache.txt beside it
    (empty if there is none, e.g. a LLAMA_CPP_BIN folder from elsewhere)."""
    build_dir = (bin_folder or bin_dir()).parent
    cache = build_dir / "CMakeCache.txt"
    if not cache.is_file():
        return {}
    keep = {"CMAKE_BUILD_TYPE", "BUILD_SHARED_LIBS", "GGML_NATIVE", "CMAKE_CXX_COMPILER", "LLAMA_OPENSSL"}
    keep |= {opt for _, opt in ISA_FLAGS}
    values = {}
    for line in cache.read_text().splitlines():
        name, _, value = line.partition("=")
        if name.split(":")[0] in keep:
            values[name.split(":")[0]] = value
    if values.get("GGML_NATIVE") == "ON":  # the ISA options are ignored then: -march=native decides
        values = {k: v for k, v in values.items() if k not in {opt for _, opt in ISA_FLAGS}}
    return {"version": VERSION, "cmake_cache": values}


def tool_path(name: str) -> Path:
    """Path of llama.cpp tool `name` (e.g. "llama-bench"), building it on first use."""
    path = bin_dir() / name
    if path.is_file():
        return path
    if os.environ.get("LLAMA_CPP_BIN"):
        raise FileNotFoundError(f"{name} is not in LLAMA_CPP_BIN={os.environ['LLAMA_CPP_BIN']}")
    build([name])
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", action="store_true", help="build every tool in TOOLS")
    ap.add_argument("--path", metavar="TOOL", help="print the path of TOOL, building it if needed")
    ap.add_argument("--flags", action="store_true", help="print the CMake flags this machine gets")
    ap.add_argument("--avx2-only", action="store_true",
                    help="with --build / --flags: the AVX2-only build (<cache>/build-avx2), AVX-512 off")
    ap.add_argument("--cache-dir", default=None, help=f"default {cache_dir()}")
    ap.add_argument("-j", "--jobs", type=int, default=None)
    args = ap.parse_args(argv)
    cache = Path(args.cache_dir) if args.cache_dir else None
    if args.flags:
        print(" ".join(cmake_flags(args.avx2_only)))
    if args.build:
        print(build(cache=cache, jobs=args.jobs, avx2_only=args.avx2_only))
    if args.path:
        print(tool_path(args.path))
    if not (args.flags or args.build or args.path):
        ap.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
