"""The C++ CPU code built without -march=native (ENTROPY_KERNELS_PORTABLE=1, as for a wheel),
and for AVX2.

The default build on an AVX-512 machine takes the AVX-512 paths (KL's log, the window pass, the
contraction's 64-byte blocking), so the loops that other CPUs run are tested here: two more
builds of csrc/ into torch's extension cache (~25 s each on 2 cores, once), called directly,
against the float64 reference.
"""
from __future__ import annotations

import shutil

import pytest
import torch

from entropy_kernels.ops import _extension

import test_contract as contract
from test_contract import Case

pytestmark = pytest.mark.skipif(shutil.which("ninja") is None, reason="the portable build needs ninja")


def _cpu_has_avx2():
    try:
        with open("/proc/cpuinfo") as f:
            return " avx2 " in f.read()
    except OSError:
        return False


# x86-64 baseline (SSE2: 16-byte vectors, no FMA) everywhere; AVX2 + FMA (32-byte vectors, 16
# registers: most desktop and AMD machines) where the CPU can run it.
TARGETS = [("baseline", [])] + ([("avx2", ["-mavx2", "-mfma"])] if _cpu_has_avx2() else [])


@pytest.fixture(scope="module", params=TARGETS, ids=[t[0] for t in TARGETS])
def portable(request):
    from torch.utils import cpp_extension

    name, extra = request.param
    return cpp_extension.load(
        name=f"entropy_kernels_cpu_{name}",
        sources=_extension.sources(cuda=False),
        extra_cflags=_extension.cxx_flags(portable=True) + extra,
        extra_include_paths=[str(_extension.CSRC)],
    )


class Raw:
    """The backend contract on the raw module: D, and the gradient through its backward."""

    def __init__(self, module):
        self.module = module

    def local_divergence(self, u, m, ut, mt, win_h, win_w, valid, bins, bandwidth, kernel, divergence, eps):
        ids = (_extension.KERNEL_IDS[kernel], _extension.DIVERGENCE_IDS[divergence])
        module = self.module

        class Op(torch.autograd.Function):
            @staticmethod
            def forward(ctx, u_, m_):
                d, gu1, gm1 = module.forward(u_, m_, ut, mt, win_h, win_w, valid, bins, bandwidth, *ids, eps, True)
                ctx.save_for_backward(u_, m_, d, gu1, gm1)
                return d

            @staticmethod
            def backward(ctx, grad):
                u_, m_, d, gu1, gm1 = ctx.saved_tensors
                return tuple(module.backward(grad.contiguous(), d, u_, m_, ut, mt, gu1, gm1, win_h, win_w, valid, bins,
                                             bandwidth, *ids, eps))

        return Op.apply(u, m)


# bins 32 and 16: the window pass's compiled sizes; 7 and 70: the generic loops and the
# contraction's strips.
CASES = [
    Case(2, 13, 11, 32, (5, 5)),
    Case(1, 9, 12, 16, (3, 5), True, "gaussian", "hellinger"),
    Case(2, 8, 7, 7, (11, 11), False, "gaussian"),
    Case(1, 6, 5, 70, (3, 3), False, "logistic", "hellinger"),
]


@pytest.mark.parametrize("grad_output", list(contract.GRAD_OUTPUTS))
@pytest.mark.parametrize("case", CASES, ids=Case.id)
def test_portable_build_parity_float64(portable, case, grad_output, gen):
    # uniform: the forward's own gradient, rescaled by the backward
    contract.check_float64_parity("cpp", Raw(portable), "cpu", case, case.maps(gen),
                                  contract.GRAD_OUTPUTS[grad_output](case.out_shape, gen), plain=False)


@pytest.mark.parametrize("divergence", ["kl", "hellinger"])
@pytest.mark.parametrize("kernel", ["logistic", "gaussian"])
def test_portable_build_float32_arithmetic_error(portable, kernel, divergence, gen):
    """The contract's float32 rule (float64 reference on the float32 inputs): the portable exp/log
    polynomials and the float32 contraction, bins 32, window 11."""
    case = Case(2, 23, 19, 32, (11, 11), False, kernel, divergence)
    contract.check_float32_rule("cpp", Raw(portable), "cpu", case, case.maps(gen),
                                contract.GRAD_OUTPUTS["random"](case.out_shape, gen).float().double())
