"""The CUDA kernels of csrc/entropy_cuda.cu compiled as C++ against the emulator in tests/simt and
served with the backend contract of entropy_kernels.reference (tests/test_cuda_emulated.py says
what the emulator can and cannot show).

The glue is what csrc/bindings.cpp puts around the launchers on CUDA tensors: the summed-area
tables of non-finite pixels and of poisoned windows, and zero-filled gradients. The kernels see
host pointers; everything else is the code a GPU runs, except that expf and logf are the host's
(csrc/entropy_math.h's CPU polynomials).
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import torch
import torch.nn.functional as F

from entropy_kernels.ops import _extension
from entropy_kernels.ops.cuda import _Schedule

ROOT = Path(__file__).resolve().parents[1]
SIMT = ROOT / "tests" / "simt"
CXX = shutil.which("g++") or shutil.which("c++")
TWO_BLOCKS_PER_SM = 2**64 - 1  # csrc/entropy_cuda.h's kTwoBlocksPerSm: the budgets' policy


def compile_shared(source: Path, out: Path) -> ctypes.CDLL:
    """source as C++ against the emulator; warnings about our own sources fail the build."""
    cmd = [
        CXX, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Wno-unknown-pragmas", "-shared", "-fPIC",
        f"-I{SIMT}", f"-I{ROOT / 'csrc'}", "-x", "c++", str(source), "-o", str(out),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stderr}"
    assert "warning" not in result.stderr.lower(), result.stderr
    return ctypes.CDLL(str(out))


def summed_area(mark: torch.Tensor) -> torch.Tensor:
    """int32 (N, R + 1, C + 1) table of a (N, R, C) mask, as bindings.cpp's summed_area."""
    return F.pad(mark.int().cumsum(1).cumsum(2), (1, 0, 1, 0)).int().contiguous()


def pointer(t):
    return ctypes.c_void_p(t.data_ptr())


def _pointers(maps):
    """u_pred, m_pred, u_tgt, m_tgt as the C array the shim takes."""
    return (ctypes.c_void_p * len(maps))(*[t.data_ptr() for t in maps])


def window_bounds(extent, side, valid):
    """Window c covers [lo[c], hi[c]) along an axis (csrc/entropy_math.h's Axis)."""
    offset, out = (0, extent - side + 1) if valid else (side // 2, extent)
    c = torch.arange(out)
    return (c - offset).clamp(min=0), (c - offset + side).clamp(max=extent)


class EmulatedCuda:
    """The backend contract (entropy_kernels.reference) served by the emulated CUDA launchers, with
    bindings.cpp's glue. With fused, a forward whose maps require grad also computes the gradient
    for grad_output = 1, which the backward scales when grad_output is uniform (as the op does).
    schedule: the launch schedule each call passes (the op's private argument), the library's
    policy by default."""

    def __init__(self, lib, fused=False, schedule=_Schedule()):
        self.lib, self.fused, self.schedule = lib, fused, schedule

    def _problem(self, u, win_h, win_w, valid, bins, bandwidth, kernel, divergence, eps):
        n, height, width = u.shape
        *ring_and_column_ring, tensor_cores, step = self.schedule.op_argument()
        return (
            0 if u.dtype == torch.float32 else 1, n, height, width, bins, win_h, win_w, int(valid),
            ctypes.c_double(bandwidth), ctypes.c_double(eps), _extension.KERNEL_IDS[kernel],
            _extension.DIVERGENCE_IDS[divergence],
            *(ctypes.c_size_t(TWO_BLOCKS_PER_SM if budget < 0 else budget) for budget in ring_and_column_ring),
            tensor_cores, step,
        )

    def forward(self, maps, win_h, win_w, valid, bins, bandwidth, kernel, divergence, eps, with_grad=False):
        """D, and (grad_u, grad_m) for grad_output = 1 when with_grad (else None)."""
        u = maps[0]
        n, height, width = u.shape
        ho, wo = (height - win_h + 1, width - win_w + 1) if valid else (height, width)
        bad = summed_area(~(maps[0].isfinite() & maps[1].isfinite() & maps[2].isfinite() & maps[3].isfinite()))
        d = torch.empty(n, ho, wo, dtype=u.dtype)
        pointers = _pointers(maps)
        problem = self._problem(u, win_h, win_w, valid, bins, bandwidth, kernel, divergence, eps)
        if not with_grad:
            rc = self.lib.ek_emulated_forward(*problem, pointers, pointer(bad), pointer(d))
            assert rc == 0, f"forward launch failed: cudaError_t {rc}"
            return d, None
        (r0, r1), (c0, c1) = window_bounds(height, win_h, valid), window_bounds(width, win_w, valid)
        count = bad[:, r1][:, :, c1] - bad[:, r0][:, :, c1] - bad[:, r1][:, :, c0] + bad[:, r0][:, :, c0]
        bad_windows = summed_area(count > 0)
        gu, gm = torch.zeros_like(u), torch.zeros_like(u)
        rc = self.lib.ek_emulated_forward_with_grad(
            *problem, pointers, pointer(bad), pointer(bad_windows), pointer(d), pointer(gu), pointer(gm)
        )
        assert rc == 0, f"fused forward launch failed: cudaError_t {rc}"
        return d, (gu, gm)

    def backward(self, maps, d, grad, win_h, win_w, valid, bins, bandwidth, kernel, divergence, eps):
        grad = grad.contiguous()
        poison = summed_area(~(d.isfinite() & grad.isfinite()))
        gu, gm = torch.zeros_like(maps[0]), torch.zeros_like(maps[0])
        pointers = _pointers(maps)
        rc = self.lib.ek_emulated_backward(
            *self._problem(maps[0], win_h, win_w, valid, bins, bandwidth, kernel, divergence, eps), pointers,
            pointer(d), pointer(grad), pointer(poison), pointer(gu), pointer(gm),
        )
        assert rc == 0, f"backward launch failed: cudaError_t {rc}"
        return gu, gm

    def local_divergence(self, u_pred, m_pred, u_tgt, m_tgt, *args):
        return _Emulated.apply(self, u_pred, m_pred, u_tgt, m_tgt, *args)


class _Emulated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, impl, u_pred, m_pred, u_tgt, m_tgt, *args):
        maps = [t.detach().contiguous() for t in (u_pred, m_pred, u_tgt, m_tgt)]
        with_grad = impl.fused and (u_pred.requires_grad or m_pred.requires_grad) and args[-1] > 0
        d, grads1 = impl.forward(maps, *args, with_grad=with_grad)
        ctx.impl, ctx.args, ctx.maps, ctx.d, ctx.grads1 = impl, args, maps, d, grads1
        return d

    @staticmethod
    def backward(ctx, grad):
        g0 = grad.reshape(-1)[0]
        if ctx.grads1 is not None and torch.isfinite(g0) and torch.equal(grad, g0.expand_as(grad)):
            gu, gm = (t * g0 for t in ctx.grads1)
        else:
            gu, gm = ctx.impl.backward(ctx.maps, ctx.d, grad, *ctx.args)
        return (None, gu, gm, None, None) + (None,) * len(ctx.args)


def load_shim(folder: Path) -> ctypes.CDLL:
    """The emulated launchers (tests/simt/shim.cpp), built in folder."""
    return compile_shared(SIMT / "shim.cpp", folder / "entropy_cuda_emulated.so")
