"""The accuracy contract a loss backend is held to against the float64 reference.

The test suite, ``python -m entropy_kernels.check`` and the GPU-session tools all judge a backend
with these functions, so a backend you build or run on a new machine can be checked the same way::

    import torch
    from entropy_kernels import reference, testing
    from entropy_kernels.ops import cpp

    args = (5, 5, False, 16, 0.5, "logistic", "kl", 1e-10)  # win_h, win_w, valid, bins, h, kernel, divergence, eps
    maps = [torch.rand(2, 19, 17, dtype=torch.float64) * 15 for _ in range(4)]
    testing.assert_float64_parity(cpp.local_divergence(*maps, *args),
                                  reference.local_divergence(*maps, *args), "cpp")

    maps32 = [m.float() for m in maps]  # inputs exactly representable in float32
    ours, ref32 = (b.local_divergence(*maps32, *args) for b in (cpp, reference))
    exact = reference.local_divergence(*(m.double() for m in maps32), *args)
    problem = testing.float32_rule_violation(ours, ref32, exact, "cpp")
    assert not problem, problem

Two rules:

- **float64 parity**: every element of a backend's float64 result (D or a gradient) is within
  ``atol + of_max * max|expected| + rtol * |expected|`` of the reference's. The fused backends
  slide their window sums (add the entering pixels, subtract the leaving ones), which leaves an
  absolute error of ~1e-16 of the window's largest cell where the reference's direct sums keep full
  relative precision; log(Q + eps) and P / (Q + eps) raise it by up to 1 / eps in cells with
  Q << eps. The C++ and CUDA backends reach ~1.1e-7 of the map's largest value (1 x 1 Gaussian
  windows); Triton is held to its own, tighter bound (docs/cpu.md, docs/triton.md). A wrong index or
  formula gives errors of order one.
- **float32 rule** (as in flash-attention's tests): on inputs representable in float32, the
  backend's float32 error against the float64 reference is at most twice the error of the
  reference itself run in float32. The error is the root-mean-square of each element's error scaled
  by ``|exact| +`` the map's RMS (unscaled, a few large values dominate a small map and the ratio of
  two equally accurate float32 computations is noisy: benchmarks/error_rule_noise.py). Where a
  backend's arithmetic allows it (C++, CUDA) the largest element's error is held to the same
  factor too, on maps of at least :data:`LARGEST_ERROR_MIN_ELEMENTS` elements: over fewer the ratio
  of maxima is noise (2.2 for the C++ backend on 84 elements; for Triton, whose per-pixel dot
  products round in another order, 3.7: docs/triton.md), and on maps that small one element 64 ulps
  off already breaks the RMS rule. The largest error is allowed :data:`LARGEST_ERROR_FLOOR_ULPS` float32 ulps
  (of 1, scaled by the map's largest value) on top: the reference's own largest error can fall
  below one ulp of the largest value by chance (3.4e-7 on a map whose largest value is 4.29, where
  an ulp is 4.8e-7; the CUDA kernels' ratio of largest errors reached 2.15 on 12 x 13 maps, one in
  450), and twice that is not a bound any float computation keeps.

Gradients are checked with :func:`torch.autograd.gradcheck` at :data:`GRADCHECK`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch

__all__ = ["Tolerance", "Contract", "CONTRACTS", "GRADCHECK", "LARGEST_ERROR_MIN_ELEMENTS", "LARGEST_ERROR_FLOOR_ULPS", "contract", "float32_error_scale", "float64_parity_error",
           "assert_float64_parity", "float32_rule_violation"]


@dataclass(frozen=True)
class Tolerance:
    """|got - expected| <= atol + of_max * max|expected| + rtol * |expected|, element by element."""

    of_max: float
    rtol: float
    atol: float

    def bound(self, expected: torch.Tensor) -> torch.Tensor:
        finite = expected[torch.isfinite(expected)]
        largest = float(finite.abs().max()) if finite.numel() else 0.0
        return self.atol + self.of_max * largest + self.rtol * expected.abs()


@dataclass(frozen=True)
class Contract:
    """What one backend is held to: its float64 tolerance, and whether the float32 rule also bounds
    the largest element's error (not only the scaled RMS) on maps large enough for it."""

    float64: Tolerance
    float32_largest_error: bool


# The sliding window sums in float64 (C++ and CUDA share the scheme): 1e-6 of the largest value,
# ~10x the worst error measured (see the module docstring).
_SLIDING_SUMS = Contract(Tolerance(of_max=1e-6, rtol=0.0, atol=1e-12), float32_largest_error=True)
CONTRACTS: Dict[str, Contract] = {
    "cpp": _SLIDING_SUMS,
    "cuda": _SLIDING_SUMS,
    # Triton's window states are float64 tiles from tl.dot: 1.2e-8 of the largest value was the worst
    # of 41 seeds (bins 33, Gaussian), which had failed a bound of 1e-8 once.
    "triton": Contract(Tolerance(of_max=1e-7, rtol=1e-9, atol=1e-13), float32_largest_error=False),
}

# torch.autograd.gradcheck's keywords for a backend's float64 loss or divergence.
GRADCHECK = dict(eps=1e-6, atol=1e-8, rtol=1e-6)

_FLOOR = 1e-30  # only matters when both float32 errors are exactly zero
LARGEST_ERROR_MIN_ELEMENTS = 100
LARGEST_ERROR_FLOOR_ULPS = 2


def contract(backend: str) -> Contract:
    """The contract of a fused backend by name ('cpp', 'cuda', 'triton')."""
    try:
        return CONTRACTS[backend]
    except KeyError:
        raise ValueError(f"no accuracy contract for backend={backend!r}; known: {sorted(CONTRACTS)}") from None


def float64_parity_error(got: torch.Tensor, expected: torch.Tensor, backend: str,
                         tolerance: Optional[Tolerance] = None) -> float:
    """The worst element's error as a fraction of the backend's float64 tolerance, or of `tolerance`
    when given (<= 1 passes).

    NaN must sit where the reference has NaN (then those elements are not compared); a NaN or a
    shape elsewhere gives inf."""
    got, expected = got.detach().cpu().double(), expected.detach().cpu().double()
    if got.shape != expected.shape or not torch.equal(got.isnan(), expected.isnan()):
        return float("inf")
    if got.numel() == 0:
        return 0.0
    compared = ~expected.isnan()
    tolerance = tolerance or contract(backend).float64
    ratio = (got - expected).abs()[compared] / tolerance.bound(expected)[compared]
    return float(ratio.max()) if ratio.numel() else 0.0


def assert_float64_parity(got: torch.Tensor, expected: torch.Tensor, backend: str, name: str = "",
                          tolerance: Optional[Tolerance] = None) -> None:
    """Raises AssertionError naming the worst element unless `got` meets the backend's float64
    tolerance (or `tolerance`, when given: a test may hold a backend to a stricter one)."""
    used = float64_parity_error(got, expected, backend, tolerance)
    if used <= 1.0:
        return
    got, expected = got.detach().cpu().double(), expected.detach().cpu().double()
    if got.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(got.shape)}, reference {tuple(expected.shape)}")
    if not torch.equal(got.isnan(), expected.isnan()):
        raise AssertionError(f"{name}: NaN at {int(got.isnan().sum())} elements, reference at "
                             f"{int(expected.isnan().sum())}, not the same ones")
    error = (got - expected).nan_to_num().abs()
    worst = int(error.argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), got.shape))
    raise AssertionError(
        f"{name}: {backend} float64 differs from the reference by {error.view(-1)[worst]:.3e} at {index} "
        f"({got.view(-1)[worst]:.17g} vs {expected.view(-1)[worst]:.17g}), {used:.3g} x its tolerance "
        f"{tolerance or contract(backend).float64}")


def float32_error_scale(exact: torch.Tensor) -> torch.Tensor:
    """What the float32 rule scales each element's error by: |exact| + the RMS of the exact map."""
    return exact.abs() + exact.norm() / exact.numel() ** 0.5 + _FLOOR


def _scaled_rms(x: torch.Tensor, exact: torch.Tensor) -> float:
    return float(((x - exact) / float32_error_scale(exact)).norm()) / exact.numel() ** 0.5


def float32_rule_violation(ours: torch.Tensor, ref32: torch.Tensor, exact: torch.Tensor, backend: str) -> str:
    """Why `ours` (the backend's float32 result) breaks the float32 rule, or '' when it keeps it.

    `ref32` is the reference run in float32 and `exact` the reference in float64, both on the same
    float32-representable inputs as `ours`."""
    ours, ref32, exact = (t.detach().cpu().double() for t in (ours, ref32, exact))
    problems = []
    mine, theirs = _scaled_rms(ours, exact), _scaled_rms(ref32, exact)
    if not mine <= 2 * theirs + _FLOOR:
        problems.append(f"scaled RMS error {mine:.3e} vs reference float32 {theirs:.3e}")
    if contract(backend).float32_largest_error and exact.numel() >= LARGEST_ERROR_MIN_ELEMENTS:
        mine, theirs = float((ours - exact).abs().max()), float((ref32 - exact).abs().max())
        floor = LARGEST_ERROR_FLOOR_ULPS * torch.finfo(torch.float32).eps * float(exact.abs().max())
        if not mine <= 2 * theirs + floor:
            problems.append(f"largest error {mine:.3e} vs reference float32 {theirs:.3e}")
    return "; ".join(problems)
