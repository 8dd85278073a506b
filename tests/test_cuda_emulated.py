"""backend='cuda''s kernels (csrc/entropy_cuda.cu) run on the CPU by a CUDA emulator, against the
float64 reference.

CI has no GPU, so until now the CUDA kernels' indexing, barriers, shuffles and NaN bookkeeping
were checked only in sessions lent one (tests/test_cpp.py runs them on CUDA tensors there).
Here the same source is compiled as C++ against tests/simt/simt.h, which runs a block's threads
as fibers switched at its barriers (what it can and cannot show is written there), and called
through the glue csrc/bindings.cpp puts around the launchers on CUDA tensors: the summed-area
tables of non-finite pixels and of poisoned windows, and zero-filled gradients. The kernels see
host pointers; everything else is the code a GPU runs, except that expf and logf are the host's
(csrc/entropy_math.h's CPU polynomials).
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from entropy_kernels import reference
from entropy_kernels.ops import _extension
from entropy_kernels.ops.cuda import _Schedule
from test_cpp import (
    CASES, assert_close_f64, check_float32_arithmetic_rule, check_parity_f64, random_maps, values_and_grads,
)

ROOT = Path(__file__).resolve().parents[1]
SIMT = ROOT / "tests" / "simt"
CXX = shutil.which("g++") or shutil.which("c++")
pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler")


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


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return compile_shared(SIMT / "shim.cpp", tmp_path_factory.mktemp("simt") / "entropy_cuda_emulated.so")


@pytest.fixture(scope="module")
def selftest(tmp_path_factory):
    return compile_shared(SIMT / "selftest.cu", tmp_path_factory.mktemp("simt") / "selftest.so")


def summed_area(mark: torch.Tensor) -> torch.Tensor:
    """int32 (N, R + 1, C + 1) table of a (N, R, C) mask, as bindings.cpp's summed_area."""
    return F.pad(mark.int().cumsum(1).cumsum(2), (1, 0, 1, 0)).int().contiguous()


def _ptr(t):
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
        *ring_and_column_ring, tensor_cores = self.schedule.op_argument()
        return (
            0 if u.dtype == torch.float32 else 1, n, height, width, bins, win_h, win_w, int(valid),
            ctypes.c_double(bandwidth), ctypes.c_double(eps), _extension.KERNEL_IDS[kernel],
            _extension.DIVERGENCE_IDS[divergence],
            *(ctypes.c_size_t(TWO_BLOCKS_PER_SM if budget < 0 else budget) for budget in ring_and_column_ring),
            tensor_cores,
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
            rc = self.lib.ek_emulated_forward(*problem, pointers, _ptr(bad), _ptr(d))
            assert rc == 0, f"forward launch failed: cudaError_t {rc}"
            return d, None
        (r0, r1), (c0, c1) = window_bounds(height, win_h, valid), window_bounds(width, win_w, valid)
        count = bad[:, r1][:, :, c1] - bad[:, r0][:, :, c1] - bad[:, r1][:, :, c0] + bad[:, r0][:, :, c0]
        bad_windows = summed_area(count > 0)
        gu, gm = torch.zeros_like(u), torch.zeros_like(u)
        rc = self.lib.ek_emulated_forward_with_grad(
            *problem, pointers, _ptr(bad), _ptr(bad_windows), _ptr(d), _ptr(gu), _ptr(gm)
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
            _ptr(d), _ptr(grad), _ptr(poison), _ptr(gu), _ptr(gm),
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


SM_SHARED = 227 * 1024  # an sm_90 block's most dynamic shared memory

TWO_BLOCKS_PER_SM = 2**64 - 1  # csrc/entropy_cuda.h's kTwoBlocksPerSm: the budgets' policy

# The kernels' schedules: the G of the windows in T and the last column sums both kept in shared
# memory wherever they fit an SM (at bins 32 / window 11 the library's policy keeps only the G ring
# there, the column ring in the forward); the G ring alone (every column sum computed twice);
# neither (a second window state slides behind the first to recompute G).
SCHEDULES = {
    "rings": _Schedule(SM_SHARED, SM_SHARED), "g-ring": _Schedule(SM_SHARED, 0), "two-states": _Schedule(0, 0),
}


@pytest.fixture(scope="module", params=list(SCHEDULES))
def cuda_emulated(lib, request):
    return EmulatedCuda(lib, schedule=SCHEDULES[request.param])


@pytest.fixture(scope="module")
def cuda_emulated_fused(lib):
    return EmulatedCuda(lib, fused=True)


# Beyond tests/test_cpp.py's CASES, the kernels' own layouts: bins 32 at window 11 (4 cells per
# thread, the training default), bins 33..64 (16 cells per thread), windows taller than the 16
# image rows staged in shared memory at a time (several chunks per column sum and gradient), and
# the smallest bins.
CUDA_CASES = [
    (2, 13, 15, 32, 11, 11, False, "logistic", "kl"),
    (1, 7, 9, 40, 3, 5, False, "gaussian", "hellinger"),
    (1, 6, 5, 64, 3, 3, True, "logistic", "kl"),
    (1, 21, 6, 6, 19, 3, False, "gaussian", "kl"),
    (2, 40, 5, 5, 34, 3, True, "logistic", "hellinger"),
    (1, 5, 6, 2, 3, 3, False, "gaussian", "kl"),  # the fewest bins: two lanes of warp 0 hold all cells
    (1, 6, 7, 33, 5, 3, False, "logistic", "hellinger"),  # 16 cells per thread, staged stride 36
]


def case_id(c):
    return "x".join(map(str, c[:6])) + f"-{c[6]}-{c[7]}-{c[8]}"


@pytest.mark.parametrize("case", CASES + CUDA_CASES, ids=case_id)
def test_contract_parity_float64(cuda_emulated, case):
    check_parity_f64(cuda_emulated, case)


@pytest.mark.parametrize("kernel, divergence", [("logistic", "kl"), ("gaussian", "hellinger")])
def test_float32_arithmetic_error_within_twice_reference_float32(cuda_emulated, kernel, divergence):
    """tests/test_cpp.py's float32 rule (bins 32, window 11, error at most twice the reference's own
    float32 error against float64 on the same inputs), for the kernels' float32 instantiation."""
    check_float32_arithmetic_rule(cuda_emulated, kernel, divergence, 17, 19)


@pytest.mark.parametrize("where", [0, 3])
def test_nan_map_gives_nan_in_exactly_the_affected_windows(cuda_emulated, where):
    bins = 6
    maps = random_maps(1, 9, 10, bins)
    maps[where][0, 2, 7] = float("nan")  # a pred intensity or a target neighbour value
    args = (3, 3, False, bins, 0.5, "logistic", "kl", 1e-10)
    d_ref = reference.local_divergence(*maps, *args)
    u, m = maps[0].clone().requires_grad_(True), maps[1].clone().requires_grad_(True)
    d = cuda_emulated.local_divergence(u, m, maps[2], maps[3], *args)
    assert torch.equal(torch.isnan(d.detach()), torch.isnan(d_ref))
    assert torch.isnan(d).sum() == 9  # the 3x3 windows containing the pixel
    finite = torch.isfinite(d_ref)
    assert_close_f64(d.detach()[finite], d_ref[finite])
    gu, gm = torch.autograd.grad(d.sum(), (u, m))
    # Pixels under a NaN window get NaN gradients (the 5x5 block around the pixel); the others stay finite.
    assert torch.isnan(gu).sum() == 25 and torch.isnan(gm).sum() == 25
    assert torch.isfinite(gu).sum() == 90 - 25


def test_nan_grad_output_poisons_only_its_window_pixels(cuda_emulated):
    bins = 6
    maps = random_maps(1, 8, 8, bins)
    args = (3, 3, False, bins, 0.5, "gaussian", "hellinger", 1e-10)
    g = torch.rand(1, 8, 8, dtype=torch.float64) * 2 - 0.5
    g[0, 4, 4] = float("nan")
    outs = []
    for impl in (reference, cuda_emulated):
        u, m = maps[0].clone().requires_grad_(True), maps[1].clone().requires_grad_(True)
        outs.append(torch.autograd.grad(impl.local_divergence(u, m, maps[2], maps[3], *args), (u, m), g))
    (gu_ref, gm_ref), (gu, gm) = outs
    assert torch.equal(torch.isnan(gu), torch.isnan(gu_ref)) and torch.isnan(gu).sum() == 9
    assert torch.equal(torch.isnan(gm), torch.isnan(gm_ref))
    finite = torch.isfinite(gu_ref)
    assert_close_f64(gu[finite], gu_ref[finite])


# ---- the fused forward (D and the gradient for grad_output = 1 in one pass) ----------------

FUSED_CASES = [CASES[0], CASES[1], CASES[3], CUDA_CASES[0], CUDA_CASES[1], CUDA_CASES[3]]


@pytest.mark.parametrize("case", FUSED_CASES, ids=case_id)
def test_fused_forward_parity_float64(cuda_emulated_fused, case):
    """A uniform grad_output (the 'mean' and 'sum' reductions) takes the fused pass's gradient,
    scaled; a random one recomputes it in the backward."""
    maps = check_parity_f64(cuda_emulated_fused, case, grad_out=-0.75)
    check_parity_f64(cuda_emulated_fused, case, maps=maps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("divergence", ["kl", "hellinger"])
def test_fused_forward_is_the_forward_and_the_backward(cuda_emulated, dtype, divergence):
    """Bit for bit: the fused pass's D is the forward kernel's (the leading window state slides
    through the same column sums in the same order), and its gradient is the backward kernel's
    for grad_output = 1, NaN bookkeeping included (the emulator's atomics run in a fixed order)."""
    bins = 9
    maps = [t.to(dtype) for t in random_maps(2, 11, 13, bins)]
    maps[2][1, 4, 6] = float("nan")  # a target pixel: NaN windows and the gradients under them
    args = (5, 3, False, bins, 0.5, "gaussian", divergence, 1e-10)
    d, _ = cuda_emulated.forward(maps, *args)
    d_fused, (gu_fused, gm_fused) = cuda_emulated.forward(maps, *args, with_grad=True)
    gu, gm = cuda_emulated.backward(maps, d, torch.ones_like(d), *args)
    assert torch.isnan(d).sum() == 15 and torch.isnan(gu).sum() == 9 * 5  # 5x3 windows; the pixels under them
    assert torch.equal(d.isnan(), d_fused.isnan()) and torch.equal(d.nan_to_num(), d_fused.nan_to_num())
    for ours, theirs in ((gu_fused, gu), (gm_fused, gm)):
        assert torch.equal(ours.isnan(), theirs.isnan()) and torch.equal(ours.nan_to_num(), theirs.nan_to_num())


# Dynamic shared memory in KiB of the forward, the fused pass and the backward in float32 at bins
# 32 / window 11 (docs/cuda.md): staged kernel values 16 (+ T, 8, in the backward), the G ring 44,
# the column ring 96 (the backward's only together with the G ring).
SCHEDULE_SHARED_KIB = {
    "policy": (_Schedule(), (112, 68, 68)),
    "rings": (SCHEDULES["rings"], (112, 164, 164)),
    "g-ring": (SCHEDULES["g-ring"], (16, 68, 68)),
    "two-states": (SCHEDULES["two-states"], (16, 24, 24)),
    "column-ring-alone": (_Schedule(0, SM_SHARED), (112, 24, 24)),
}


@pytest.mark.parametrize("name", list(SCHEDULE_SHARED_KIB))
def test_schedule_argument_sets_the_rings(lib, name):
    """Each call's schedule argument, not a setting left by an earlier call, decides the rings its
    launches keep (the library's policy, two blocks per SM, where it is absent)."""
    schedule, expected = SCHEDULE_SHARED_KIB[name]
    lib.ek_emulated_last_launch_shared.restype = ctypes.c_size_t
    bins = 32
    maps = [t.float() for t in random_maps(1, 11, 13, bins)]
    args = (11, 11, True, bins, 0.5, "logistic", "kl", 1e-10)
    d, grad = torch.rand(2, 1, 1, 3).float()  # 'valid': 1 x 3 windows
    impl = EmulatedCuda(lib, schedule=schedule)
    other = EmulatedCuda(lib, schedule=SCHEDULES["two-states" if name == "rings" else "rings"])
    kib = []
    for run in (lambda e: e.forward(maps, *args), lambda e: e.forward(maps, *args, with_grad=True),
                lambda e: e.backward(maps, d, grad, *args)):
        run(other)  # a call with other budgets first: nothing carries over
        run(impl)
        kib.append(lib.ek_emulated_last_launch_shared() / 1024)
    assert tuple(kib) == expected


@pytest.mark.parametrize("dtype, tensor_cores", [(torch.float32, False), (torch.float32, True), (torch.float64, False)],
                         ids=["float32", "float32-tensor-cores", "float64"])
def test_column_ring_changes_no_bit(lib, dtype, tensor_cores):
    """The column ring holds each column sum exactly (one chunk of rows, in T), so with it the
    forward, the fused pass and the backward give D and the gradients bit for bit as when every
    column sum is computed twice (bins 32, window 11: 4 cells per thread, the training case); the
    tensor-core products, too, are the same bits each time a column sum is computed."""
    bins = 32
    maps = [t.to(dtype) for t in random_maps(2, 12, 14, bins)]
    args = (11, 11, False, bins, 0.5, "logistic", "kl", 1e-10)
    grad = torch.rand(2, 12, 14, dtype=dtype) - 0.25
    outs = []
    for column_ring in (SM_SHARED, 0):
        impl = EmulatedCuda(lib, schedule=_Schedule(SM_SHARED, column_ring, tensor_cores))
        d, _ = impl.forward(maps, *args)
        d_fused, grads1 = impl.forward(maps, *args, with_grad=True)
        outs.append((d, d_fused, *grads1, *impl.backward(maps, d, grad, *args)))
    for ours, theirs in zip(*outs):
        assert torch.isfinite(ours).all() and torch.equal(ours, theirs)
    assert torch.equal(outs[0][0], outs[0][1])  # and the fused pass's D is the forward's


@pytest.mark.parametrize("per_sm_kib, optin_kib", [(100, 99), (164, 163)], ids=["sm_86", "sm_80"])
def test_rings_fit_the_device(lib, per_sm_kib, optin_kib):
    """The default budgets follow the device (half an SM's shared memory, within what a block may opt
    in to): on GPUs with less shared memory than an H100 (RTX 30/40: 100 KiB per SM, 99 per block;
    A100: 164 and 163) every pass at bins 32 / window 11 still launches and matches the reference,
    and budgets asked beyond the device are cut to it."""
    bins = 32
    maps = random_maps(1, 12, 13, bins)
    args = (11, 11, False, bins, 0.5, "logistic", "kl", 1e-10)
    lib.ek_emulated_set_device_shared(ctypes.c_size_t(per_sm_kib * 1024), ctypes.c_size_t(optin_kib * 1024))
    try:
        for schedule in (_Schedule(), SCHEDULES["rings"]):
            # float64 (about twice the bytes) and float32, through the forward and backward
            # kernels and through the fused pass
            for impl in (EmulatedCuda(lib, schedule=schedule), EmulatedCuda(lib, fused=True, schedule=schedule)):
                d_ref, gu_ref, gm_ref, g = values_and_grads(reference, maps, args)
                d, gu, gm, _ = values_and_grads(impl, maps, args, g)
                assert_close_f64(d, d_ref)
                assert_close_f64(gu, gu_ref)
                assert_close_f64(gm, gm_ref)
                check_float32_arithmetic_rule(impl, "logistic", "kl", 12, 13)
    finally:
        lib.ek_emulated_set_device_shared(ctypes.c_size_t(228 * 1024), ctypes.c_size_t(SM_SHARED))


# ---- the emulator itself ----------------------------------------------------------------------

@pytest.mark.parametrize("threads", [32, 96, 256])
def test_emulator_block_reduction_with_shuffles(selftest, threads):
    blocks = 3
    x = torch.randn(blocks * threads, dtype=torch.float64)
    out = torch.zeros(blocks, dtype=torch.float64)
    assert selftest.simt_block_sum(_ptr(x), _ptr(out), blocks, threads) == 0
    torch.testing.assert_close(out, x.view(blocks, threads).sum(1), rtol=1e-14, atol=1e-14)


def test_emulator_reports_a_deadlock(selftest):
    out = torch.zeros(64)
    assert selftest.simt_deadlock(_ptr(out)) == 719  # cudaErrorLaunchFailure


def test_emulator_shared_memory_starts_unwritten(selftest):
    out = torch.zeros(64)
    assert selftest.simt_unwritten_shared(_ptr(out), 64) == 0
    torch.testing.assert_close(out[:63], torch.arange(1, 64, dtype=torch.float32))
    assert torch.isnan(out[63])  # the slot no thread wrote


def test_emulator_dynamic_shared_memory_limit(selftest):
    out = torch.zeros(1)
    assert selftest.simt_atomic(_ptr(out), 128, 48 * 1024, 0) == 0
    assert out.item() == sum(range(128))  # the atomics
    assert selftest.simt_atomic(_ptr(out), 128, 64 * 1024, 0) == 1  # over 48 KiB without opting in
    assert selftest.simt_atomic(_ptr(out), 128, 64 * 1024, 64 * 1024) == 0
    assert selftest.simt_atomic(_ptr(out), 128, 64 * 1024, 228 * 1024) == 1  # above an sm_90 SM's 227 KiB
    assert selftest.simt_atomic(_ptr(out), 2048, 0, 0) == 9  # more than 1024 threads per block


@pytest.mark.parametrize("bandwidth", [0.7, 0.25, 2.0])
def test_bandwidths_parity_float64(cuda_emulated_fused, bandwidth):
    """A power-of-two bandwidth is applied as a product with its exact reciprocal, any other as a
    division: both against the reference, through the fused pass and the backward."""
    bins = 11
    maps = random_maps(2, 9, 10, bins)
    args = (5, 3, False, bins, bandwidth, "logistic", "hellinger", 1e-10)
    for grad_out in (1.5, None):
        d_ref, gu_ref, gm_ref, g = values_and_grads(reference, maps, args, grad_out)
        d, gu, gm, _ = values_and_grads(cuda_emulated_fused, maps, args, g)
        assert_close_f64(d, d_ref)
        assert_close_f64(gu, gu_ref)
        assert_close_f64(gm, gm_ref)


# ---- float column sums on tensor cores (3xTF32 products, csrc/ek_mma.h) ---------------------

# Float at bins <= 32: the warps' 16 x 8 tiles partly (bins 5, 17) or wholly past L (bins 2, 5: some
# warps skip), one k-step of 8 rows or two, a second chunk of rows holding one row (window 17 rows),
# 'valid', both kernels and divergences.
TENSOR_CORE_CASES = [
    (2, 9, 7, 5, 3, 3, False, "logistic", "kl"),
    (1, 19, 6, 17, 17, 3, False, "gaussian", "hellinger"),
    (1, 8, 10, 32, 5, 3, True, "gaussian", "kl"),
    (2, 13, 15, 32, 11, 11, False, "logistic", "hellinger"),
    (1, 5, 6, 2, 3, 3, True, "logistic", "kl"),
]


@pytest.fixture(scope="module")
def cuda_emulated_tensor_cores(lib):
    return EmulatedCuda(lib, fused=True, schedule=_Schedule(tensor_core_column_sums=True))


@pytest.mark.parametrize("grad_out", [None, -0.75], ids=["random-grad", "uniform-grad"])
@pytest.mark.parametrize("case", TENSOR_CORE_CASES, ids=case_id)
def test_tensor_core_column_sums_keep_the_float32_rule(cuda_emulated_tensor_cores, case, grad_out):
    """D and both gradients in float32 err against float64 at most twice as much as the reference
    run in float32 (plus 4 float ulps of the largest value, for cases where the reference's own float32
    error is next to nothing). One TF32 product per column sum instead of three fails this at bins 32."""
    n, h, w, bins, win_h, win_w, valid, kernel, divergence = case
    args = (win_h, win_w, valid, bins, 0.5, kernel, divergence, 1e-10)
    maps64 = random_maps(n, h, w, bins)
    maps32 = [t.float() for t in maps64]
    maps64 = [t.double() for t in maps32]  # the same inputs
    exact = values_and_grads(reference, maps64, args, grad_out)
    g = exact[3]
    ref32 = values_and_grads(reference, maps32, args, g.float())
    ours = values_and_grads(cuda_emulated_tensor_cores, maps32, args, g.float())
    for name, o, r, e in zip(("D", "grad_u", "grad_m"), ours[:3], ref32[:3], exact[:3]):
        assert o.dtype == torch.float32
        floor = 4 * torch.finfo(torch.float32).eps * e.abs().max().item()
        err, ref_err = (o.double() - e).abs().max().item(), (r.double() - e).abs().max().item()
        assert err <= 2 * ref_err + floor, (name, err, ref_err, floor)
