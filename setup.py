"""Build script.

With torch importable at build time (``pip install --no-build-isolation -e .``) this compiles
the C++ extension ``entropy_kernels._C_cpu`` from csrc/, and ``entropy_kernels._C_cuda`` too
where torch has CUDA and nvcc is found. Without torch (an isolated build) the package is
installed pure-Python and the extension is JIT-built with ninja at first use
(entropy_kernels/ops/_extension.py). torch is never pinned.

Environment switches: ENTROPY_KERNELS_NO_BUILD=1 skips the extensions (JIT at first use);
ENTROPY_KERNELS_NO_CUDA=1 skips the CUDA one; ENTROPY_KERNELS_PORTABLE=1 drops -march=native.
"""
import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent


def _flags_module():
    # The flags and source lists live in _extension.py (shared with the JIT build); load that
    # file alone so the package itself is not imported during the build.
    spec = importlib.util.spec_from_file_location("_ek_extension", HERE / "entropy_kernels" / "ops" / "_extension.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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

setup(
    name="entropy-kernels",
    version="0.1.0",
    description="Fused differentiable spatial entropy loss and an IR-SDE low-light enhancement stack",
    packages=find_packages(include=["entropy_kernels", "entropy_kernels.*", "model", "model.*", "train", "train.*"]),
    python_requires=">=3.9",
    install_requires=["torch", "numpy", "pyyaml", "tqdm", "pillow", "scipy", "scikit-image"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
