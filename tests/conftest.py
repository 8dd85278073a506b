import os
import shutil

import pytest
import torch

# Without a GPU, Triton's kernels run in its interpreter, which Triton binds when a kernel is
# defined: the variable must be set before anything imports Triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Tests never read or write the user's cache (demo data, fetched metric weights)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("ENTROPY_KERNELS_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture
def gen():
    """A freshly seeded generator; the seed is printed so that a failure can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="session")
def emulated_cuda_lib(tmp_path_factory):
    """The CUDA kernels built against the emulator (tests/emulated_cuda.py), once per session."""
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler")
    from emulated_cuda import load_shim

    return load_shim(tmp_path_factory.mktemp("simt"))
