"""Builds pyengine._C through CMake (see CMakeLists.txt).

Environment:
  PYENGINE_CUDA=1/0   force the CUDA backend on or off (default: on if nvcc is found)
  PYENGINE_BUILD_TYPE Release (default) or Debug/RelWithDebInfo
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        import pybind11

        cfg = os.environ.get("PYENGINE_BUILD_TYPE", "Release")
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
        ]
        cuda = os.environ.get("PYENGINE_CUDA")
        if cuda is not None:
            args.append(f"-DPYENGINE_CUDA={'ON' if cuda.lower() in ('1', 'on', 'true', 'yes') else 'OFF'}")
        try:
            import ninja  # noqa: F401

            args += ["-G", "Ninja"]
        except ImportError:
            pass
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "--config", cfg, "-j", jobs], cwd=build_dir, check=True)


setup(
    packages=["pyengine", "pyengine_convert"],
    package_dir={"pyengine": "pyengine", "pyengine_convert": "tools/convert"},
    ext_modules=[CMakeExtension("pyengine._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
