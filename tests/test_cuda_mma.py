"""csrc/ek_mma.h's warp-level matrix product (m16n8k8, TF32 operands, float accumulators), as the
CPU emulator (tests/simt/simt.h) runs it, against plain products in float64.

The kernels in tests/simt/mma_test.cu load A, B and C into the fragments PTX documents and store D
from its fragments, so a wrong layout in the emulated instruction scrambles D. Where a GPU of
compute capability 8.0 or later is present the same file is compiled by nvcc and the same checks run
on the instruction itself: that is what ties the emulation (layout and rounding) to the hardware.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from test_cuda_emulated import CXX, compile_shared

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "tests" / "simt" / "mma_test.cu"
NVCC = shutil.which("nvcc")
HAS_SM80 = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def _compile_device(out: Path) -> ctypes.CDLL:
    major, minor = torch.cuda.get_device_capability()
    cmd = [NVCC, "-shared", "-Xcompiler", "-fPIC", "-std=c++17", "-O3", f"-arch=sm_{major}{minor}",
           f"-I{ROOT / 'csrc'}", str(SOURCE), "-o", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr}"
    return ctypes.CDLL(str(out))


PLATFORMS = [pytest.param("emulated", marks=pytest.mark.skipif(CXX is None, reason="no C++ compiler")),
             pytest.param("device", marks=pytest.mark.skipif(not (HAS_SM80 and NVCC), reason="no sm_80+ GPU"))]


@pytest.fixture(scope="module", params=PLATFORMS)
def mma(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("mma") / "mma_test.so"
    if request.param == "emulated":
        return compile_shared(SOURCE, out), torch.device("cpu")
    return _compile_device(out), torch.device("cuda")


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr())


def run_mma(mma, A, B, C, mode, threads=32):
    lib, device = mma
    A, B, C = (torch.as_tensor(x, dtype=torch.float32).to(device).contiguous() for x in (A, B, C))
    D = torch.full((16, 8), float("nan"), device=device)
    rc = lib.simt_mma(_ptr(A), _ptr(B), _ptr(C), _ptr(D), mode, threads)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return rc, D.cpu().numpy().astype(np.float64)


def tf32_nearest(x: np.ndarray) -> np.ndarray:
    """The TF32 value nearest each float, ties away from zero, chosen by comparing distances in
    float64 between the two TF32 neighbours (not by the bit trick the emulator uses)."""
    bits = x.astype(np.float32).view(np.uint32)
    x64 = x.astype(np.float64)
    with np.errstate(invalid="ignore"):  # infinities (kept as they are) have a NaN neighbour
        toward_zero = (bits & np.uint32(0xFFFFE000)).view(np.float32).astype(np.float64)
        away = ((bits & np.uint32(0xFFFFE000)) + np.uint32(0x2000)).view(np.float32).astype(np.float64)
        nearest = np.where(np.abs(away - x64) <= np.abs(x64 - toward_zero), away, toward_zero)
    return np.where(np.isfinite(x64), nearest, x64)


def tf32_truncated(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.float32).view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32).astype(np.float64)


def sum_bound(A, B, C):
    """A float accumulation of C plus 8 exact products errs by at most ~9 ulps of the sum of magnitudes
    (the tensor core's truncating adds by a few more: the bound allows 16)."""
    return 16 * np.finfo(np.float32).eps * (np.abs(A) @ np.abs(B) + np.abs(C))


@pytest.mark.parametrize("form", [0, 1], ids=["cvt.rna", "integer-form"])
def test_to_tf32_rounds_to_nearest_ties_away(mma, form):
    """to_tf32 and to_tf32_bits (the two integer operations the tensor-core step splits with) give the
    nearest TF32 value, ties away from zero, for finite values and keep infinities."""
    lib, device = mma
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(4096) * 2.0 ** rng.integers(-20, 20, 4096)).astype(np.float32)
    bits = x.view(np.uint32)
    # Exact ties (low 13 bits 0x1000) of both signs, and values just below and above them.
    ties = (bits[:64] & np.uint32(0xFFFFE000)) | np.uint32(0x1000)
    x = np.concatenate([x, ties.view(np.float32), (ties - 1).view(np.float32), (ties + 1).view(np.float32),
                        np.array([np.inf, -np.inf, 0.0, -0.0, np.finfo(np.float32).tiny], dtype=np.float32)])
    xs = torch.from_numpy(x).to(device)
    out = torch.empty_like(xs)
    assert lib.simt_to_tf32(_ptr(xs), _ptr(out), xs.numel(), form) == 0
    if device.type == "cuda":
        torch.cuda.synchronize()
    np.testing.assert_array_equal(out.cpu().numpy().astype(np.float64), tf32_nearest(x))


@pytest.mark.parametrize("seed", range(3))
def test_product_follows_the_documented_fragments(mma, seed):
    rng = np.random.default_rng(seed)
    A, B = tf32_nearest(rng.standard_normal((16, 8))), tf32_nearest(rng.standard_normal((8, 8)))
    C = rng.standard_normal((16, 8)).astype(np.float32).astype(np.float64)
    rc, D = run_mma(mma, A, B, C, mode=0)
    assert rc == 0
    assert np.all(np.abs(D - (A @ B + C)) <= sum_bound(A, B, C))


def test_operand_bits_past_tf32_are_truncated(mma):
    """What the emulator assumes of a plain float operand; the kernels round every operand with to_tf32
    first (mode 1), so they do not depend on it."""
    rng = np.random.default_rng(3)
    A, B = rng.standard_normal((16, 8)), rng.standard_normal((8, 8))
    C = np.zeros((16, 8))
    rc, D = run_mma(mma, A, B, C, mode=0)
    assert rc == 0
    At, Bt = tf32_truncated(A), tf32_truncated(B)
    assert np.all(np.abs(D - At @ Bt) <= sum_bound(At, Bt, C))
    rc, D = run_mma(mma, A, B, C, mode=1)
    An, Bn = tf32_nearest(A), tf32_nearest(B)
    assert rc == 0 and np.all(np.abs(D - An @ Bn) <= sum_bound(An, Bn, C))


def test_split_product_is_as_accurate_as_float(mma):
    """3xTF32 of plain floats errs like a float product (a few ulps of the sum of magnitudes, as the
    CUDA kernels' FMA path); one TF32 product errs ~1000x more."""
    rng = np.random.default_rng(4)
    A = rng.random((16, 8)).astype(np.float32).astype(np.float64)  # kernel values are positive
    B = rng.random((8, 8)).astype(np.float32).astype(np.float64)
    C = rng.random((16, 8)).astype(np.float32).astype(np.float64)
    exact, scale = A @ B + C, np.abs(A) @ np.abs(B) + np.abs(C)
    rc, split = run_mma(mma, A, B, C, mode=2)
    assert rc == 0
    split_err = np.max(np.abs(split - exact) / scale)
    _, one = run_mma(mma, A, B, C, mode=1)
    one_err = np.max(np.abs(one - exact) / scale)
    assert split_err <= 8 * np.finfo(np.float32).eps, split_err
    assert one_err > 100 * split_err, (one_err, split_err)


def test_partial_warp_is_a_launch_failure(mma):
    if mma[1].type == "cuda":
        pytest.skip("undefined behaviour on a device, not a reported error")
    rc, _ = run_mma(mma, np.zeros((16, 8)), np.zeros((8, 8)), np.zeros((16, 8)), mode=0, threads=16)
    assert rc == 719  # cudaErrorLaunchFailure
