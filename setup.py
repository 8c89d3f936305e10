"""Builds pyengine._C through CMake (see CMakeLists.txt).

Environment:
  PYENGINE_CUDA=1/0   force the CUDA backend on or off (default: on when nvcc is found and nvidia-smi
                      lists a GPU; a machine without a GPU gets the CPU-only module in about a minute
                      instead of several minutes of CUDA compilation; CI sets 1 to compile the CUDA sources)
  PYENGINE_CUDA_ARCHS GPU architectures to compile for (default: those of the GPUs nvidia-smi lists, so a
                      GPU machine compiles one architecture instead of four; without a visible GPU
                      "80;86;89;90", CMakeLists.txt's default)
  PYENGINE_BUILD_TYPE Release (default) or Debug/RelWithDebInfo
  PYENGINE_SANITIZE   e.g. "address,undefined": an instrumented module (own build folder); see
                      README "Sanitizer and fuzz runs" for how to run the tests with it
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _drop_stale_cache(build_dir: Path) -> None:
    """pip builds each time in a fresh isolated environment: a CMake cache that points at a build
    tool from an environment that is gone would fail to configure, so start that build afresh."""
    cache = build_dir / "CMakeCache.txt"
    if not cache.is_file():
        return
    for line in cache.read_text(errors="replace").splitlines():
        if line.startswith(("CMAKE_MAKE_PROGRAM:", "CMAKE_COMMAND:")):
            tool = line.split("=", 1)[-1].strip()
            if tool and not Path(tool).exists():
                shutil.rmtree(build_dir)
                build_dir.mkdir(parents=True)
                return


def _local_gpu_archs() -> "str | None":
    """The compute capabilities of this machine's GPUs as CMake architectures ("90"), or None."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    archs = sorted({line.strip().replace(".", "") for line in out.splitlines() if line.strip()})
    return ";".join(archs) if archs and all(a.isdigit() for a in archs) else None


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        sanitize = os.environ.get("PYENGINE_SANITIZE", "")
        # A sanitized build keeps its own CMake cache, so switching back and forth rebuilds neither from scratch.
        build_dir = Path(self.build_temp).resolve() / (ext.name + (f"-san-{sanitize.replace(',', '-')}" if sanitize else ""))
        build_dir.mkdir(parents=True, exist_ok=True)
        _drop_stale_cache(build_dir)
        import pybind11

        cfg = os.environ.get("PYENGINE_BUILD_TYPE", "Release")
        # Each build folder links into its own output folder, copied to out_dir below: a sanitized and
        # a normal build never see each other's module as up to date.
        lib_dir = build_dir / "out"
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={lib_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DPYENGINE_SANITIZE={sanitize}",
        ]
        cuda = os.environ.get("PYENGINE_CUDA")
        local_archs = _local_gpu_archs()
        if cuda is not None:
            args.append(f"-DPYENGINE_CUDA={'ON' if cuda.lower() in ('1', 'on', 'true', 'yes') else 'OFF'}")
        elif local_archs is None:
            args.append("-DPYENGINE_CUDA=OFF")  # no GPU here (CMake alone would build CUDA wherever nvcc is)
        archs = os.environ.get("PYENGINE_CUDA_ARCHS") or local_archs
        if archs:
            args.append(f"-DPYENGINE_CUDA_ARCHS={archs}")
        try:
            import ninja  # noqa: F401

            args += ["-G", "Ninja"]
        except ImportError:
            pass
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "--config", cfg, "-j", jobs], cwd=build_dir, check=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        built = lib_dir / Path(self.get_ext_fullpath(ext.name)).name
        shutil.copyfile(built, out_dir / built.name)
        shutil.copymode(built, out_dir / built.name)


    def copy_extensions_to_source(self) -> None:
        # Replace the in-place module by rename, never by overwriting: processes that have the old
        # module mapped (tests, servers) would crash if its pages changed under them.
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            fullname = self.get_ext_fullname(ext.name)
            filename = self.get_ext_filename(fullname)
            package = ".".join(fullname.split(".")[:-1])
            dest = os.path.join(build_py.get_package_dir(package), os.path.basename(filename))
            tmp = dest + ".tmp"
            shutil.copyfile(os.path.join(self.build_lib, filename), tmp)
            shutil.copymode(os.path.join(self.build_lib, filename), tmp)
            os.replace(tmp, dest)


setup(
    packages=["pyengine", "pyengine.commands", "pyengine.server", "pyengine_convert"],
    package_dir={"pyengine": "pyengine", "pyengine_convert": "tools/convert"},
    ext_modules=[CMakeExtension("pyengine._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
