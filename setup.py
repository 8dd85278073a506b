"""The compiled extension; the package's metadata is in pyproject.toml.

With torch importable at build time (``pip install --no-build-isolation -e .``) this compiles
the C++ extension ``entropy_kernels._C_cpu`` from csrc/, and ``entropy_kernels._C_cuda`` too
where torch has CUDA and nvcc is found. Without torch (an isolated build) the package is
installed pure-Python and the extension is JIT-built with ninja at first use
(entropy_kernels/ops/_extension.py). torch is never pinned.

Environment switches: ENTROPY_KERNELS_NO_BUILD=1 skips the extensions (JIT at first use);
ENTROPY_KERNELS_NO_CUDA=1 skips the CUDA one; ENTROPY_KERNELS_PORTABLE=1 drops -march=native
(for a wheel that runs on other machines: docs/install.md).
"""
import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
CSRC_SUFFIXES = (".cpp", ".cu", ".h")


def _flags_module():
    # The flags and source lists live in _extension.py (shared with the JIT build); load that
    # file alone so the package itself is not imported during the build.
    spec = importlib.util.spec_from_file_location("_ek_extension", HERE / "entropy_kernels" / "ops" / "_extension.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithSources(build_py):
    """Copies csrc/ into the built package as entropy_kernels/csrc/: the sources the JIT build of
    an installed wheel compiles where its prebuilt extension does not load (another torch, or a
    wheel built without one). csrc/ stays the one copy in the repository."""

    def run(self):
        super().run()
        if self.editable_mode:  # an editable install compiles csrc/ in place
            return
        target = Path(self.build_lib) / "entropy_kernels" / "csrc"
        target.mkdir(parents=True, exist_ok=True)
        for source in sorted((HERE / "csrc").iterdir()):
            if source.suffix in CSRC_SUFFIXES:
                shutil.copy2(source, target / source.name)


def extensions():
    if os.environ.get("ENTROPY_KERNELS_NO_BUILD", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return [], {}
    ext = _flags_module()
    rel = lambda paths: [os.path.relpath(p, HERE) for p in paths]  # noqa: E731 - setuptools wants relative paths
    modules = [
        cpp_extension.CppExtension(
            "entropy_kernels._C_cpu",
            rel(ext.sources(cuda=False)),
            include_dirs=[str(HERE / "csrc")],
            extra_compile_args={"cxx": ext.cxx_flags()},
        )
    ]
    if (
        os.environ.get("ENTROPY_KERNELS_NO_CUDA", "0") != "1"
        and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
    ):
        modules.append(
            cpp_extension.CUDAExtension(
                "entropy_kernels._C_cuda",
                rel(ext.sources(cuda=True)),
                include_dirs=[str(HERE / "csrc")],
                extra_compile_args={"cxx": ext.cxx_flags(), "nvcc": ["-O3"]},
            )
        )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    return modules, {"build_ext": build_ext}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass={**cmdclass, "build_py": BuildPyWithSources})
