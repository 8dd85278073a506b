"""Build script. The compiled backends in csrc/ are added by the csrc issue; until then
this installs the pure-Python package."""
from setuptools import find_packages, setup

setup(
    name="entropy-kernels",
    version="0.1.0",
    description="Fused differentiable spatial entropy loss and an IR-SDE low-light enhancement stack",
    packages=find_packages(include=["entropy_kernels", "entropy_kernels.*", "model", "model.*", "train", "train.*"]),
    python_requires=">=3.9",
    install_requires=["torch", "numpy"],
)
