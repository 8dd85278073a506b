"""What is specific to backend='cuda''s kernels (csrc/entropy_cuda.cu) run on the CPU by a CUDA
emulator: their schedules and layouts, the fused pass bit for bit, the shared-memory budgets, and the
emulator itself. tests/test_contract.py runs the contract on them (fused, as the op is).

CI has no GPU, so until now the CUDA kernels' indexing, barriers, shuffles and NaN bookkeeping
were checked only in sessions lent one (tests/test_cpp.py runs them on CUDA tensors there).
Here the same source is compiled as C++ against tests/simt/simt.h, which runs a block's threads
as fibers switched at its barriers (what it can and cannot show is written there), and called
through tests/emulated_cuda.py, the glue csrc/bindings.cpp puts around the launchers.
"""
from __future__ import annotations

import ctypes

import pytest
import torch

import test_contract as contract
from emulated_cuda import CXX, SIMT, EmulatedCuda, compile_shared, pointer
from entropy_kernels import reference, testing
from entropy_kernels.ops.cuda import _Schedule
from test_contract import Backend, Case
from test_cpp import random_maps, values_and_grads

pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler")


@pytest.fixture(scope="module")
def lib(emulated_cuda_lib):
    """The session's emulated launchers (tests/conftest.py)."""
    return emulated_cuda_lib


@pytest.fixture(scope="module")
def selftest(tmp_path_factory):
    return compile_shared(SIMT / "selftest.cu", tmp_path_factory.mktemp("simt") / "selftest.so")


SM_SHARED = 227 * 1024  # an sm_90 block's most dynamic shared memory

# The kernels' schedules: the G of the windows in T and the last column sums both kept in shared
# memory wherever they fit an SM (at bins 32 / window 11 the library's policy keeps only the G ring
# there, the column ring in the forward); the G ring alone (every column sum computed twice);
# neither (a second window state slides behind the first to recompute G).
# These are the sliding kernels' schedules: the fused float pass stays on them (tensor_core_step=False);
# the tensor-core step has its own tests below.
SLIDING = dict(tensor_core_step=False)
SCHEDULES = {
    "rings": _Schedule(SM_SHARED, SM_SHARED, **SLIDING), "g-ring": _Schedule(SM_SHARED, 0, **SLIDING),
    "two-states": _Schedule(0, 0, **SLIDING),
}


@pytest.fixture(scope="module", params=list(SCHEDULES))
def cuda_emulated(lib, request):
    return EmulatedCuda(lib, schedule=SCHEDULES[request.param])


@pytest.fixture(scope="module")
def cuda_emulated_fused(lib):
    return EmulatedCuda(lib, fused=True)


# Beyond the contract's cases, the kernels' own layouts: bins 32 at window 11 (4 cells per thread,
# the training default), bins 33..64 (16 cells per thread), windows taller than the 16 image rows
# staged in shared memory at a time (several chunks per column sum and gradient), and the smallest bins.
CUDA_CASES = [
    Case(2, 13, 15, 32, (11, 11)),
    Case(1, 7, 9, 40, (3, 5), False, "gaussian", "hellinger"),
    Case(1, 6, 5, 64, (3, 3), True),
    Case(1, 21, 6, 6, (19, 3), False, "gaussian"),
    Case(2, 40, 5, 5, (34, 3), True, "logistic", "hellinger"),
    Case(1, 5, 6, 2, (3, 3), False, "gaussian", note="the fewest bins: one thread's block holds all cells"),
    Case(1, 6, 7, 33, (5, 3), False, "logistic", "hellinger", note="16 cells per thread, staged stride 36"),
]
# The contract's cases that ran under every schedule before it ran them fused: odd sizes, images
# smaller than the window, global, 1 x 1 and rectangular windows, both paddings, kernels, divergences.
SCHEDULE_CASES = contract.PARITY_CASES[:7] + CUDA_CASES


def emulated(impl):
    return Backend("cuda", impl, torch.device("cpu"), public=False, compiled=False, id="cuda-emulated")


@pytest.mark.parametrize("case", SCHEDULE_CASES, ids=Case.id)
def test_contract_parity_float64(cuda_emulated, case, gen):
    """The forward kernel and the backward kernel (not fused) of each schedule."""
    contract.check_float64_parity("cuda", cuda_emulated, "cpu", case, case.maps(gen),
                                  contract.GRAD_OUTPUTS["random"](case.out_shape, gen), plain=False)


@pytest.mark.parametrize("kernel, divergence", [("logistic", "kl"), ("gaussian", "hellinger")])
def test_float32_rule(cuda_emulated, kernel, divergence, gen):
    """The contract's float32 rule at bins 32, window 11, for each schedule."""
    case = Case(2, 17, 19, 32, (11, 11), False, kernel, divergence)
    contract.check_float32_rule("cuda", cuda_emulated, "cpu", case, case.maps(gen),
                                contract.GRAD_OUTPUTS["random"](case.out_shape, gen).float().double())


@pytest.mark.parametrize("where", [0, 3])
def test_nan_map_gives_nan_in_exactly_the_affected_windows(cuda_emulated, where, gen):
    contract.test_nan_map_gives_nan_in_exactly_the_affected_windows(emulated(cuda_emulated), where, gen)


def test_nan_grad_output_poisons_only_its_window_pixels(cuda_emulated, gen):
    contract.test_nan_grad_output_poisons_only_its_window_pixels(emulated(cuda_emulated), gen)


@pytest.mark.parametrize("case", [CUDA_CASES[0], CUDA_CASES[1], CUDA_CASES[3]], ids=Case.id)
@pytest.mark.parametrize("grad_output", list(contract.GRAD_OUTPUTS))
def test_fused_forward_parity_float64(cuda_emulated_fused, case, grad_output, gen):
    """A uniform grad_output (the 'mean' and 'sum' reductions) takes the fused pass's gradient,
    scaled; a random one recomputes it in the backward (the contract's cases run fused too)."""
    contract.check_float64_parity("cuda", cuda_emulated_fused, "cpu", case, case.maps(gen),
                                  contract.GRAD_OUTPUTS[grad_output](case.out_shape, gen))


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
    "policy": (_Schedule(**SLIDING), (112, 68, 68)),
    "rings": (SCHEDULES["rings"], (112, 164, 164)),
    "g-ring": (SCHEDULES["g-ring"], (16, 68, 68)),
    "two-states": (SCHEDULES["two-states"], (16, 24, 24)),
    "column-ring-alone": (_Schedule(0, SM_SHARED, **SLIDING), (112, 24, 24)),
    # the fused pass on the tensor-core step: T 8, the column sums' staging 2 x 16, the gradient's
    # 12.5, partial sums 0.25, the G ring 44, the column ring 96 (one block per SM); its policy takes
    # what a block may have; where two staging buffers do not fit a budget, one
    "step": (_Schedule(), (112, 192.75, 68)),
    "step-without-column-ring": (_Schedule(None, 0), (16, 96.75, 68)),
    "step-one-buffer": (_Schedule(90 * 1024, 0), (16, 80.75, 68)),
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
        impl = EmulatedCuda(lib, schedule=_Schedule(SM_SHARED, column_ring, tensor_cores, **SLIDING))
        d, _ = impl.forward(maps, *args)
        d_fused, grads1 = impl.forward(maps, *args, with_grad=True)
        outs.append((d, d_fused, *grads1, *impl.backward(maps, d, grad, *args)))
    for ours, theirs in zip(*outs):
        assert torch.isfinite(ours).all() and torch.equal(ours, theirs)
    assert torch.equal(outs[0][0], outs[0][1])  # and the fused pass's D is the forward's


@pytest.mark.parametrize("per_sm_kib, optin_kib", [(100, 99), (164, 163)], ids=["sm_86", "sm_80"])
def test_rings_fit_the_device(lib, per_sm_kib, optin_kib, gen):
    """The default budgets follow the device (half an SM's shared memory, within what a block may opt
    in to): on GPUs with less shared memory than an H100 (RTX 30/40: 100 KiB per SM, 99 per block;
    A100: 164 and 163) every pass at bins 32 / window 11 still launches and matches the reference,
    and budgets asked beyond the device are cut to it."""
    bins = 32
    maps = random_maps(1, 12, 13, bins)
    args = (11, 11, False, bins, 0.5, "logistic", "kl", 1e-10)
    lib.ek_emulated_set_device_shared(ctypes.c_size_t(per_sm_kib * 1024), ctypes.c_size_t(optin_kib * 1024))
    try:
        for schedule in (_Schedule(), _Schedule(**SLIDING), SCHEDULES["rings"]):
            # float64 (about twice the bytes) and float32, through the forward and backward
            # kernels and through the fused pass
            for impl in (EmulatedCuda(lib, schedule=schedule), EmulatedCuda(lib, fused=True, schedule=schedule)):
                d_ref, gu_ref, gm_ref, g = values_and_grads(reference, maps, args)
                d, gu, gm, _ = values_and_grads(impl, maps, args, g)
                for name, got, expected in (("D", d, d_ref), ("grad_u", gu, gu_ref), ("grad_m", gm, gm_ref)):
                    testing.assert_float64_parity(got, expected, "cuda", name)
                case = Case(1, 12, 13, bins, (11, 11))
                contract.check_float32_rule("cuda", impl, "cpu", case, case.maps(gen),
                                            contract.GRAD_OUTPUTS["random"](case.out_shape, gen).float().double())
    finally:
        lib.ek_emulated_set_device_shared(ctypes.c_size_t(228 * 1024), ctypes.c_size_t(SM_SHARED))


# ---- the emulator itself ----------------------------------------------------------------------

@pytest.mark.parametrize("threads", [32, 96, 256])
def test_emulator_block_reduction_with_shuffles(selftest, threads):
    blocks = 3
    x = torch.randn(blocks * threads, dtype=torch.float64)
    out = torch.zeros(blocks, dtype=torch.float64)
    assert selftest.simt_block_sum(pointer(x), pointer(out), blocks, threads) == 0
    torch.testing.assert_close(out, x.view(blocks, threads).sum(1), rtol=1e-14, atol=1e-14)


def test_emulator_reports_a_deadlock(selftest):
    out = torch.zeros(64)
    assert selftest.simt_deadlock(pointer(out)) == 719  # cudaErrorLaunchFailure


def test_emulator_shared_memory_starts_unwritten(selftest):
    out = torch.zeros(64)
    assert selftest.simt_unwritten_shared(pointer(out), 64) == 0
    torch.testing.assert_close(out[:63], torch.arange(1, 64, dtype=torch.float32))
    assert torch.isnan(out[63])  # the slot no thread wrote


def test_emulator_dynamic_shared_memory_limit(selftest):
    out = torch.zeros(1)
    assert selftest.simt_atomic(pointer(out), 128, 48 * 1024, 0) == 0
    assert out.item() == sum(range(128))  # the atomics
    assert selftest.simt_atomic(pointer(out), 128, 64 * 1024, 0) == 1  # over 48 KiB without opting in
    assert selftest.simt_atomic(pointer(out), 128, 64 * 1024, 64 * 1024) == 0
    assert selftest.simt_atomic(pointer(out), 128, 64 * 1024, 228 * 1024) == 1  # above an sm_90 SM's 227 KiB
    assert selftest.simt_atomic(pointer(out), 2048, 0, 0) == 9  # more than 1024 threads per block


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
    return EmulatedCuda(lib, fused=True, schedule=_Schedule(tensor_core_column_sums=True, **SLIDING))


@pytest.mark.parametrize("grad_out", [None, -0.75], ids=["random-grad", "uniform-grad"])
@pytest.mark.parametrize("case", TENSOR_CORE_CASES, ids=lambda c: "x".join(map(str, c[:6])) + f"-{c[6]}-{c[7]}-{c[8]}")
def test_tensor_core_column_sums_keep_the_float32_rule(cuda_emulated_tensor_cores, case, grad_out):
    """D and both gradients in float32 err against float64 at most twice as much as the reference
    run in float32 (plus 4 float ulps of the largest value, for cases where the reference's own float32
    error is next to nothing). One TF32 product per column sum instead of three fails this at bins 32."""
    check_float32_rule_with_floor(cuda_emulated_tensor_cores, case, grad_out)


def check_float32_rule_with_floor(impl, case, grad_out):
    """The float32 rule on D and both gradients of one call (case: n, h, w, bins, win_h, win_w, valid,
    kernel, divergence), with a floor of 4 float ulps of the largest value."""
    n, h, w, bins, win_h, win_w, valid, kernel, divergence = case
    args = (win_h, win_w, valid, bins, 0.5, kernel, divergence, 1e-10)
    maps64 = random_maps(n, h, w, bins)
    maps32 = [t.float() for t in maps64]
    maps64 = [t.double() for t in maps32]  # the same inputs
    exact = values_and_grads(reference, maps64, args, grad_out)
    g = exact[3]
    ref32 = values_and_grads(reference, maps32, args, g.float())
    ours = values_and_grads(impl, maps32, args, g.float())
    for name, o, r, e in zip(("D", "grad_u", "grad_m"), ours[:3], ref32[:3], exact[:3]):
        assert o.dtype == torch.float32
        floor = 4 * torch.finfo(torch.float32).eps * e.abs().max().item()
        err, ref_err = (o.double() - e).abs().max().item(), (r.double() - e).abs().max().item()
        assert err <= 2 * ref_err + floor, (name, err, ref_err, floor)


# ---- the tensor-core training step (tensor_core_step_kernel) ------------------------------------

# Odd shapes; bins 2, 5, 12, 17, 32 (warps whose tiles lie past L, one or four k-steps of the
# gradient's product); windows of 1, 3, 11 and 15 rows (one or two k-steps of the column sums, rows
# past n), wider and narrower than tall; 'same' and 'valid'; both kernels and divergences.
STEP_CASES = [
    (2, 13, 15, 32, 11, 11, False, "logistic", "kl"),
    (1, 17, 19, 32, 11, 11, True, "gaussian", "hellinger"),
    (1, 9, 10, 12, 5, 3, True, "gaussian", "hellinger"),
    (1, 7, 20, 17, 15, 5, False, "logistic", "hellinger"),
    (1, 18, 9, 32, 15, 7, True, "gaussian", "kl"),
    (1, 6, 30, 5, 3, 13, False, "logistic", "kl"),
    (1, 5, 6, 2, 1, 3, False, "gaussian", "kl"),
]
STEP_SCHEDULES = {"column-ring": _Schedule(), "no-column-ring": _Schedule(None, 0),
                  "one-buffer": _Schedule(90 * 1024, 0)}


def step_id(case):
    return "x".join(map(str, case[:6])) + f"-{'valid' if case[6] else 'same'}-{case[7]}-{case[8]}"


@pytest.fixture(scope="module", params=list(STEP_SCHEDULES))
def cuda_emulated_step(lib, request):
    return EmulatedCuda(lib, fused=True, schedule=STEP_SCHEDULES[request.param])


@pytest.mark.parametrize("grad_out", [None, -0.75], ids=["random-grad", "uniform-grad"])
@pytest.mark.parametrize("case", STEP_CASES, ids=step_id)
def test_tensor_core_step_keeps_the_float32_rule(lib, cuda_emulated_step, case, grad_out):
    """The fused float pass runs on the step (a uniform grad_output takes its gradient; a random one
    its D, with the gradient from the backward kernel) and keeps the float32 rule."""
    check_float32_rule_with_floor(cuda_emulated_step, case, grad_out)
    cuda_emulated_step.forward([t.float() for t in random_maps(*case[:4])], *case[4:6], *case[6:7], case[3], 0.5,
                               *case[7:9], 1e-10, with_grad=True)
    assert lib.ek_emulated_last_launch_was_step()


def step_outputs(lib, maps, args, schedule, reverse=False):
    lib.ek_emulated_set_reverse_order(int(reverse))
    try:
        d, (gu, gm) = EmulatedCuda(lib, fused=True, schedule=schedule).forward(maps, *args, with_grad=True)
    finally:
        lib.ek_emulated_set_reverse_order(0)
    assert lib.ek_emulated_last_launch_was_step()
    return d, gu, gm


def same_bits(a, b):
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


@pytest.mark.parametrize("case", [STEP_CASES[0], STEP_CASES[2]], ids=step_id)
def test_tensor_core_step_has_no_race_between_barriers(lib, case):
    """The block's threads run in index order and in reverse between barriers: a thread reading what
    another wrote without a barrier between them would see the other outcome (removing the barrier
    between the gradient's staging and its products changes the gradients). Both orders, with and
    without the column ring, give the same bits, NaN pixels of pred and target included."""
    n, h, w, bins = case[:4]
    args = (*case[4:6], case[6], bins, 0.5, *case[7:9], 1e-10)
    maps = [t.float() for t in random_maps(n, h, w, bins)]
    maps[0][0, 3, 4] = float("nan")
    maps[3][-1, 1, -2] = float("inf")
    runs = [step_outputs(lib, maps, args, schedule, reverse)
            for schedule in STEP_SCHEDULES.values() for reverse in (False, True)]
    for run in runs[1:]:
        assert all(same_bits(a, b) for a, b in zip(runs[0], run))


def test_tensor_core_step_nan_bookkeeping_is_the_sliding_kernels(lib):
    """Non-finite pixels give NaN in exactly the windows that hold them and NaN gradients in exactly
    the pixels under those windows, as in the sliding kernels; everything else is finite."""
    bins = 9
    maps = [t.float() for t in random_maps(2, 11, 13, bins)]
    maps[2][1, 4, 6] = float("nan")  # a target pixel
    maps[1][0, 0, 12] = float("-inf")  # a corner of pred's neighbour map
    args = (5, 3, False, bins, 0.5, "gaussian", "kl", 1e-10)
    d, gu, gm = step_outputs(lib, maps, args, _Schedule())
    d_s, (gu_s, gm_s) = EmulatedCuda(lib, fused=True, schedule=_Schedule(**SLIDING)).forward(maps, *args,
                                                                                             with_grad=True)
    assert torch.isnan(d).sum() == 15 + 2 * 3 and torch.isnan(gu).sum() == 9 * 5 + 5 * 3  # and a corner's
    for ours, theirs in ((d, d_s), (gu, gu_s), (gm, gm_s)):
        assert torch.equal(ours.isnan(), theirs.isnan())
        assert torch.isfinite(ours[~ours.isnan()]).all()


REFUSALS = {  # (bins, win_h, win_w, ring budget, column ring budget, step, device optin KiB): the reason
    "bins 33": ((33, 11, 11, -1, -1, 1, 227), "it serves bins <= 32"),
    "17 rows": ((32, 17, 3, -1, -1, 1, 227), "it serves windows of at most 16 rows"),
    "off": ((32, 11, 11, -1, -1, 0, 227), "turned off by the schedule"),
    "no G ring": ((32, 11, 11, 0, -1, 1, 227), "its G ring does not fit the shared memory allowed"),
    "small device": ((32, 11, 11, -1, -1, 1, 80), "its G ring does not fit the shared memory allowed"),
    "served": ((32, 15, 47, -1, -1, 1, 227), ""),  # the widest: 224.75 KiB with one staging buffer
    "too wide": ((32, 15, 49, -1, -1, 1, 227), "its G ring does not fit the shared memory allowed"),
    "built for sm_75": ((32, 11, 11, -1, -1, 1, 227), "the extension was not built for compute capability 8.0 or later"),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_tensor_core_step_serves_only_what_it_can(lib, name, gen):
    """What the step does not serve falls back to the sliding kernels, with the reason the launcher
    gives (csrc/entropy_cuda.cu's tensor_core_step_refusal), and the result is the same contract."""
    (bins, win_h, win_w, ring, column_ring, step, optin_kib), reason = REFUSALS[name]
    lib.ek_emulated_step_refusal.restype = ctypes.c_char_p
    budget = [ctypes.c_size_t(2**64 - 1 if b < 0 else b) for b in (ring, column_ring)]
    lib.ek_emulated_set_device_shared(ctypes.c_size_t(228 * 1024), ctypes.c_size_t(optin_kib * 1024))
    lib.ek_emulated_set_binary_version(75 if name == "built for sm_75" else 90)
    try:
        got = lib.ek_emulated_step_refusal(1, 20, 50, bins, win_h, win_w, 0, *budget, step).decode()
        assert got == reason
        schedule = _Schedule(None if ring < 0 else ring, None if column_ring < 0 else column_ring,
                             tensor_core_step=bool(step))
        case = Case(1, win_h + 2, win_w + 1, bins, (win_h, win_w))
        contract.check_float32_rule("cuda", EmulatedCuda(lib, fused=True, schedule=schedule), "cpu", case,
                                    case.maps(gen), torch.full(case.out_shape, 0.5, dtype=torch.float64))
        assert lib.ek_emulated_last_launch_was_step() == (reason == "")
    finally:
        lib.ek_emulated_set_device_shared(ctypes.c_size_t(228 * 1024), ctypes.c_size_t(SM_SHARED))
        lib.ek_emulated_set_binary_version(90)


def test_python_rule_is_the_launchers(lib):
    """entropy_kernels.ops.cuda.tensor_core_step_refusal (what a user or a benchmark asks) gives the
    launcher's reason for every problem of a grid of bins, window sides, budgets and devices."""
    from entropy_kernels.ops.cuda import tensor_core_step_refusal

    lib.ek_emulated_step_refusal.restype = ctypes.c_char_p
    checked = 0
    try:
        for optin_kib in (80, 99, 163, 227):
            lib.ek_emulated_set_device_shared(ctypes.c_size_t(228 * 1024), ctypes.c_size_t(optin_kib * 1024))
            for bins, win_h, win_w in [(32, 11, 11), (33, 3, 3), (2, 17, 3), (32, 15, 13), (32, 15, 14 * 2 + 1),
                                       (32, 5, 47), (32, 5, 49), (17, 1, 63), (17, 1, 65), (32, 16, 40)]:
                for ring, column_ring, step in [(None, None, True), (None, 0, True), (90 * 1024, 0, True),
                                                (0, None, True), (None, None, False), (150 * 1024, 120 * 1024, True)]:
                    budgets = [ctypes.c_size_t(2**64 - 1 if b is None else b) for b in (ring, column_ring)]
                    launcher = lib.ek_emulated_step_refusal(1, 20, 70, bins, win_h, win_w, 0, *budgets,
                                                            int(step)).decode()
                    ours = tensor_core_step_refusal(bins, win_h, win_w, (9, 0), optin_kib * 1024,
                                                    _Schedule(ring, column_ring, tensor_core_step=step))
                    assert ours == launcher, (optin_kib, bins, win_h, win_w, ring, column_ring, step)
                    checked += 1
    finally:
        lib.ek_emulated_set_device_shared(ctypes.c_size_t(228 * 1024), ctypes.c_size_t(SM_SHARED))
    assert checked == 240
    assert "compute capability 8.0" in tensor_core_step_refusal(32, 11, 11, (7, 5), 64 * 1024)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_training_step_kernel_names_the_devices_kernel():
    from entropy_kernels.ops.cuda import training_step_kernel

    major = torch.cuda.get_device_capability()[0]
    assert training_step_kernel("cuda", 32, 11, 11) == ("tensor-core step" if major >= 8 else
                                                        "sliding kernels: it needs a device of compute capability "
                                                        "8.0 or later (TF32 tensor cores)")
    assert training_step_kernel("cuda", 40, 11, 11) == "sliding kernels: it serves bins <= 32"

