"""Every fused backend against the float64 reference, over one case table, by the rules of
entropy_kernels.testing.

Backends: 'cpp'; 'triton' (compiled on a GPU, else in Triton's interpreter: tests/conftest.py sets
TRITON_INTERPRET before Triton is imported); 'cuda-emulated', csrc/entropy_cuda.cu's kernels run on
the CPU by tests/simt (tests/emulated_cuda.py), fused as the op is; and 'cuda' on a GPU. The
interpreter and the emulator are slow, so the shapes are tiny and each runs the cases that it ran
before this table (plus a few): `Case.skip_on` names where a case does not run. What is specific to one backend (its layouts, schedules, ops, errors) stays
in its own test file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

import pytest
import torch

import entropy_kernels
from entropy_kernels import backends, reference, testing


@dataclass(frozen=True)
class Backend:
    """A backend as the contract runs it: `impl.local_divergence` with the reference's signature on
    `device`, held to `testing.contract(name)`; `public` when spatial_entropy_loss(backend=name) reaches it."""

    name: str
    impl: object
    device: torch.device
    public: bool
    compiled: bool
    id: str  # the test id: 'cpp', 'triton' or 'triton-interpreted', 'cuda-emulated', 'cuda'

    def reasons(self, dtype: torch.dtype, bins: int):
        if self.public:
            return backends.not_supported_reasons(self.name, self.device, dtype, bins)
        return []


def _load(name):
    module, error = backends._load(name)
    if module is None:
        pytest.skip(error)
    return module


@pytest.fixture(scope="session", params=["cpp", "triton", "cuda-emulated", "cuda"])
def backend(request):
    if request.param == "cpp":
        return Backend("cpp", _load("cpp"), torch.device("cpu"), public=True, compiled=True, id="cpp")
    if request.param == "triton":
        pytest.importorskip("triton")
        gpu = torch.cuda.is_available()
        return Backend("triton", _load("triton"), torch.device("cuda" if gpu else "cpu"), public=True, compiled=gpu,
                       id="triton" if gpu else "triton-interpreted")
    if request.param == "cuda-emulated":
        from emulated_cuda import EmulatedCuda

        return Backend("cuda", EmulatedCuda(request.getfixturevalue("emulated_cuda_lib"), fused=True),
                       torch.device("cpu"), public=False, compiled=False, id="cuda-emulated")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return Backend("cuda", _load("cuda"), torch.device("cuda"), public=True, compiled=True, id="cuda")


@dataclass(frozen=True)
class Case:
    """One call of local_divergence: n planes of height x width, the options, and the value range of
    the maps in bin units (default: a little outside [0, bins - 1], as clamp=False allows)."""

    n: int
    height: int
    width: int
    bins: int
    window: Tuple[int, int]
    valid: bool = False
    kernel: str = "logistic"
    divergence: str = "kl"
    bandwidth: float = 0.5
    eps: float = 1e-10
    span: Optional[Tuple[float, float]] = None
    target_span: Optional[Tuple[float, float]] = None  # the target maps' range, when it differs
    # Backend ids that do not run the case, to keep CI's time: Triton's interpreter and the emulator
    # are ~1000x slower than compiled code.
    skip_on: Tuple[str, ...] = ()
    note: str = field(default="", compare=False)

    @property
    def args(self):
        return (*self.window, self.valid, self.bins, self.bandwidth, self.kernel, self.divergence, self.eps)

    @property
    def out_shape(self):
        if self.valid:
            return self.n, self.height - self.window[0] + 1, self.width - self.window[1] + 1
        return self.n, self.height, self.width

    def id(self):
        parts = [f"{self.n}x{self.height}x{self.width}", f"L{self.bins}", "w{}x{}".format(*self.window),
                 "valid" if self.valid else "same", self.kernel, self.divergence]
        if self.bandwidth != 0.5:
            parts.append(f"h{self.bandwidth:g}")
        if self.eps != 1e-10:
            parts.append(f"eps{self.eps:g}")
        if self.span or self.target_span:
            parts.append("apart" if self.target_span else "beyond-bins")
        return "-".join(parts)

    def maps(self, gen):
        """u_pred, m_pred, u_tgt, m_tgt in float64 on the CPU."""
        low, high = self.span or (-0.05 * (self.bins - 1), 1.05 * (self.bins - 1))
        t_low, t_high = self.target_span or (low, high)
        return [lo + (hi - lo) * torch.rand(self.n, self.height, self.width, generator=gen, dtype=torch.float64)
                for lo, hi in ((low, high), (low, high), (t_low, t_high), (t_low, t_high))]


# float64 parity: odd sizes, images smaller than the window, bins not a power of two and padded to
# 64, rectangular, 1 x 1 and global windows (even sides), both paddings, both kernels, both
# divergences, bandwidths that are powers of two (multiplied by the exact reciprocal) and not,
# values beyond the bins, eps 0 and 1e-6.
SLOW = ("triton-interpreted", "cuda-emulated")
NOT_INTERPRETED = ("triton-interpreted",)
PARITY_CASES = [
    Case(2, 9, 7, 5, (3, 3), skip_on=NOT_INTERPRETED),
    Case(1, 8, 10, 6, (5, 3), True, "gaussian", "hellinger", skip_on=NOT_INTERPRETED),
    Case(3, 5, 4, 7, (11, 11), False, "logistic", "hellinger", skip_on=NOT_INTERPRETED,
         note="image smaller than the window"),
    Case(1, 6, 4, 3, (6, 4), True, skip_on=NOT_INTERPRETED, note="global window of an even-sized image"),
    Case(2, 7, 13, 12, (1, 1), False, "gaussian", skip_on=NOT_INTERPRETED),
    Case(1, 13, 11, 9, (5, 7), False, "gaussian", skip_on=NOT_INTERPRETED),
    Case(2, 12, 9, 10, (3, 5), True, "logistic", "hellinger", skip_on=NOT_INTERPRETED),
    Case(2, 5, 7, 12, (3, 3)),
    Case(3, 5, 6, 5, (5, 5), True, "gaussian", "hellinger"),
    Case(1, 4, 5, 16, (7, 7), False, "logistic", "hellinger", bandwidth=0.3),
    Case(2, 6, 4, 3, (6, 4), True, "gaussian", eps=0.0, note="the global window at eps 0"),
    Case(1, 3, 13, 2, (1, 1), bandwidth=0.7, note="the fewest bins"),
    Case(1, 5, 5, 33, (3, 5), False, "gaussian", note="bins padded to 64"),
    Case(1, 5, 7, 9, (3, 3), False, "logistic", "hellinger", eps=1e-6, span=(-3.0, 11.0)),
    Case(1, 4, 15, 6, (3, 11), note="strips of windows clipped at both sides"),
    Case(2, 9, 10, 11, (5, 3), False, "logistic", "hellinger", bandwidth=0.7, skip_on=NOT_INTERPRETED),
    Case(2, 9, 10, 11, (5, 3), False, "logistic", "hellinger", bandwidth=0.25, skip_on=NOT_INTERPRETED),
    Case(2, 9, 10, 11, (5, 3), False, "logistic", "hellinger", bandwidth=2.0, skip_on=NOT_INTERPRETED),
]


# The float32 rule on float32 inputs: tiny maps for every backend (pred and target far apart too:
# Q is tiny where P is large, where log(Q + eps) is sensitive), and on compiled backends the
# training default (bins 32, window 11) and bins 16, window 7, each kernel with each divergence.
FLOAT32_CASES = [
    Case(2, 6, 7, 12, (3, 3)),
    Case(2, 6, 7, 7, (5, 5), False, "gaussian", "hellinger"),
    Case(2, 6, 7, 5, (1, 1), False, "gaussian", bandwidth=0.3),
    Case(2, 6, 7, 12, (3, 3), span=(0.0, 3.0), target_span=(8.0, 11.0)),
    Case(2, 17, 19, 32, (11, 11), skip_on=NOT_INTERPRETED),
    Case(2, 17, 19, 32, (11, 11), False, "gaussian", "hellinger", skip_on=NOT_INTERPRETED),
] + [
    Case(2, height, width, bins, (side, side), False, kernel, divergence, skip_on=SLOW)
    for height, width, bins, side in ((19, 17, 16, 7), (23, 29, 32, 11))
    for kernel in ("logistic", "gaussian") for divergence in ("kl", "hellinger")
]
# with a uniform grad_output on the slow backends: the first two
UNIFORM_ON_SLOW = FLOAT32_CASES[:2]

GRADCHECK_CASES = [
    Case(1, 3, 3, 5, (3, 3)),
] + [
    Case(2, 6, 5, 5, (3, 3), valid, divergence=divergence, bandwidth=0.7, skip_on=SLOW)
    for valid in (False, True) for divergence in ("kl", "hellinger")
] + [
    Case(2, 4, 3, 6, (3, 3), True, "gaussian", "hellinger", bandwidth=0.6),
]
# gradcheck's fast mode (one random projection of the Jacobian) where the full one would take minutes
FAST_GRADCHECK_ON = NOT_INTERPRETED


def _skip_unserved(backend, case, dtype):
    if backend.id in case.skip_on:
        pytest.skip(f"not run on {backend.id}: too slow")
    reasons = backend.reasons(dtype, case.bins)
    if reasons:
        pytest.skip("; ".join(reasons))


def divergence_and_grads(impl, maps, args, grad_d, dtype, device, with_grad=True):
    """D and (when with_grad) dD/du_pred, dD/dm_pred for grad_d, computed in dtype on device, as float64 on the CPU."""
    u_pred, m_pred, u_tgt, m_tgt = (x.detach().to(device, dtype, copy=True) for x in maps)
    if not with_grad:
        with torch.no_grad():
            return [impl.local_divergence(u_pred, m_pred, u_tgt, m_tgt, *args).cpu().double()]
    u_pred.requires_grad_()
    m_pred.requires_grad_()
    d = impl.local_divergence(u_pred, m_pred, u_tgt, m_tgt, *args)
    grads = torch.autograd.grad(d, (u_pred, m_pred), grad_d.to(device, dtype))
    return [t.detach().cpu().double() for t in (d, *grads)]


def check_float64_parity(backend_name, impl, device, case, maps, grad_d, plain=True):
    """D and both gradients of impl for grad_d against the reference, and with plain D computed
    without a gradient too (the plain forward; with one the op fuses the gradient's pass)."""
    expected = divergence_and_grads(reference, maps, case.args, grad_d, torch.float64, "cpu")
    got = divergence_and_grads(impl, maps, case.args, grad_d, torch.float64, device)
    for name, g, e in zip(("D", "grad_u", "grad_m"), got, expected):
        testing.assert_float64_parity(g, e, backend_name, name)
    if plain:
        (d,) = divergence_and_grads(impl, maps, case.args, None, torch.float64, device, with_grad=False)
        testing.assert_float64_parity(d, expected[0], backend_name, "D without gradient")


GRAD_OUTPUTS = {
    "random": lambda shape, gen: torch.randn(shape, generator=gen, dtype=torch.float64),
    # what 'mean' and 'sum' send: the fused forward's gradient for grad_output = 1, rescaled
    "uniform": lambda shape, gen: torch.full(shape, -0.75, dtype=torch.float64),
}


@pytest.mark.parametrize("grad_output", list(GRAD_OUTPUTS))
@pytest.mark.parametrize("case", PARITY_CASES, ids=Case.id)
def test_float64_parity(backend, case, grad_output, gen):
    _skip_unserved(backend, case, torch.float64)
    if grad_output == "uniform" and backend.id in NOT_INTERPRETED:
        pytest.skip("tests/test_triton.py checks the fused forward's rescaled gradient")
    check_float64_parity(backend.name, backend.impl, backend.device, case, case.maps(gen),
                         GRAD_OUTPUTS[grad_output](case.out_shape, gen), plain=grad_output == "random")


def check_float32_rule(backend_name, impl, device, case, maps, grad_d):
    """impl in float32 against the float64 reference on the same float32 inputs (entropy_kernels.testing's rule)."""
    maps = [x.float().double() for x in maps]
    exact = divergence_and_grads(reference, maps, case.args, grad_d, torch.float64, "cpu")
    ref32 = divergence_and_grads(reference, maps, case.args, grad_d, torch.float32, "cpu")
    ours = divergence_and_grads(impl, maps, case.args, grad_d, torch.float32, device)
    for name, o, r, e in zip(("D", "grad_u", "grad_m"), ours, ref32, exact):
        problem = testing.float32_rule_violation(o, r, e, backend_name)
        assert not problem, f"{name}: {problem}"


@pytest.mark.parametrize("grad_output", list(GRAD_OUTPUTS))
@pytest.mark.parametrize("case", FLOAT32_CASES, ids=Case.id)
def test_float32_rule(backend, case, grad_output, gen):
    _skip_unserved(backend, case, torch.float32)
    if grad_output == "uniform" and backend.id in SLOW and case not in UNIFORM_ON_SLOW:
        pytest.skip(f"not run on {backend.id}: too slow")
    check_float32_rule(backend.name, backend.impl, backend.device, case, case.maps(gen),
                       GRAD_OUTPUTS[grad_output](case.out_shape, gen).float().double())


def test_float32_rule_has_teeth(backend, gen):
    """The rule passes the backend's float32 result and fails it with 8 more ulps of error spread over
    every element, or 64 more in a single one (ulps of each element's scale), on the tiny maps."""
    case = FLOAT32_CASES[0]
    _skip_unserved(backend, case, torch.float32)
    maps = [x.float().double() for x in case.maps(gen)]
    grad_d = torch.randn(case.out_shape, generator=gen).double()
    exact = divergence_and_grads(reference, maps, case.args, grad_d, torch.float64, "cpu")
    ref32 = divergence_and_grads(reference, maps, case.args, grad_d, torch.float32, "cpu")
    ours = divergence_and_grads(backend.impl, maps, case.args, grad_d, torch.float32, backend.device)
    ulp = 2.0**-24
    for name, e, r, o in zip(("D", "grad_u", "grad_m"), exact, ref32, ours):
        assert not testing.float32_rule_violation(o, r, e, backend.name), name
        scale = testing.float32_error_scale(e)
        spread = o + 8 * ulp * scale * torch.randn(o.shape, generator=gen, dtype=o.dtype)
        assert testing.float32_rule_violation(spread, r, e, backend.name), name
        single = o.clone().view(-1)
        pick = int(torch.randint(single.numel(), (1,), generator=gen))
        single[pick] += 64 * ulp * scale.view(-1)[pick]
        assert testing.float32_rule_violation(single.view(o.shape), r, e, backend.name), name


def test_float32_largest_error_rule_on_large_maps(gen):
    """On maps of at least LARGEST_ERROR_MIN_ELEMENTS the largest error is held to twice the
    reference's plus LARGEST_ERROR_FLOOR_ULPS ulps of the map's largest value: one element off by
    two ulps of the largest value more than that fails, where the RMS rule alone would pass it."""
    exact = torch.rand(1, 20, 20, generator=gen, dtype=torch.float64) * 4 + 0.5  # 400 elements
    ulp = torch.finfo(torch.float32).eps * float(exact.abs().max())
    ref32 = exact + ulp * 0.5 * (torch.rand(exact.shape, generator=gen, dtype=torch.float64) - 0.5)
    ours = ref32.clone()
    assert not testing.float32_rule_violation(ours, ref32, exact, "cuda")
    limit = 2 * float((ref32 - exact).abs().max()) + testing.LARGEST_ERROR_FLOOR_ULPS * ulp
    ours.view(-1)[7] = exact.view(-1)[7] + 0.98 * limit  # within it
    assert not testing.float32_rule_violation(ours, ref32, exact, "cuda")
    ours.view(-1)[7] = exact.view(-1)[7] + limit + 2 * ulp
    assert "largest error" in testing.float32_rule_violation(ours, ref32, exact, "cuda")


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=Case.id)
def test_gradcheck_float64(backend, case, gen):
    _skip_unserved(backend, case, torch.float64)
    u_pred, m_pred, u_tgt, m_tgt = (x.to(backend.device) for x in case.maps(gen))
    u_pred.requires_grad_()
    m_pred.requires_grad_()

    def divergence(u, m):
        return backend.impl.local_divergence(u, m, u_tgt, m_tgt, *case.args)

    fast = backend.id in FAST_GRADCHECK_ON and case.n * case.height * case.width > 9
    assert torch.autograd.gradcheck(divergence, (u_pred, m_pred), **testing.GRADCHECK, fast_mode=fast)


@pytest.mark.parametrize("where", [0, 3], ids=["pred-intensity", "target-neighbour"])
def test_nan_map_gives_nan_in_exactly_the_affected_windows(backend, where, gen):
    case = Case(1, 9, 10, 6, (3, 3), skip_on=NOT_INTERPRETED)
    _skip_unserved(backend, case, torch.float64)
    maps = case.maps(gen)
    maps[where][0, 2, 7] = float("nan")
    d_ref = reference.local_divergence(*maps, *case.args)
    u, m, u_tgt, m_tgt = (x.to(backend.device) for x in maps)
    u.requires_grad_()
    m.requires_grad_()
    d = backend.impl.local_divergence(u, m, u_tgt, m_tgt, *case.args)
    assert torch.isnan(d).sum() == 9  # the 3x3 windows containing the pixel
    testing.assert_float64_parity(d, d_ref, backend.name, "D")  # NaN exactly where the reference has it
    gu, gm = (g.cpu() for g in torch.autograd.grad(d.sum(), (u, m)))
    # Pixels under a NaN window get NaN gradients (the 5x5 block around the pixel); the others stay finite.
    assert torch.isnan(gu).sum() == 25 and torch.isnan(gm).sum() == 25
    assert torch.isfinite(gu).sum() == 90 - 25 and torch.isfinite(gm).sum() == 90 - 25


def test_nan_grad_output_poisons_only_its_window_pixels(backend, gen):
    case = Case(1, 8, 8, 6, (3, 3), False, "gaussian", "hellinger", skip_on=NOT_INTERPRETED)
    _skip_unserved(backend, case, torch.float64)
    maps = case.maps(gen)
    grad_d = torch.rand(case.out_shape, generator=gen, dtype=torch.float64) * 2 - 0.5
    grad_d[0, 4, 4] = float("nan")
    _, gu_ref, gm_ref = divergence_and_grads(reference, maps, case.args, grad_d, torch.float64, "cpu")
    _, gu, gm = divergence_and_grads(backend.impl, maps, case.args, grad_d, torch.float64, backend.device)
    assert torch.isnan(gu).sum() == 9
    testing.assert_float64_parity(gu, gu_ref, backend.name, "grad_u")
    testing.assert_float64_parity(gm, gm_ref, backend.name, "grad_m")


# Through spatial_entropy_loss (backends a user can name): channels, three-dimensional input, window
# tuples and 'global', both paddings, the reductions, the neighbour-weight schemes, clamp=False.
API_CASES = [  # (shape, loss keywords, compiled backends only)
    ((2, 1, 9, 11), dict(bins=12, window=5, neighbor_weights="random", reduction="none"), True),
    ((2, 3, 9, 11), dict(bins=12, window=(1, 3, 5), neighbor_weights="random", reduction="none"), True),
    ((2, 3, 9, 11), dict(bins=12, window="global", neighbor_weights="random", reduction="none"), True),
    ((3, 10, 8), dict(bins=10, window=3, padding="valid", divergence="hellinger", kernel="gaussian",
                      neighbor_weights="mean"), True),
    ((1, 3, 5, 4), dict(bins=10, window=(1, 3, 5), reduction="none", divergence="hellinger", kernel="gaussian"),
     False),
    ((2, 1, 5, 6), dict(bins=7, window=3, padding="valid", reduction="sum", neighbor_weights="randn"), False),
    ((2, 1, 6, 8), dict(bins=6, window="global", reduction="none"), False),
    ((3, 5, 4), dict(bins=5, window=7, clamp=False, reduction="none", neighbor_weights="random"), False),
]


def _api_id(case):
    shape, kwargs, _ = case
    return "x".join(map(str, shape)) + "-" + "-".join(f"{v}" for k, v in kwargs.items() if k != "bins")


def _skip_unreachable(backend, bins):
    if not backend.public:
        pytest.skip("not reachable through spatial_entropy_loss")
    reasons = backend.reasons(torch.float64, bins)
    if reasons:
        pytest.skip("; ".join(reasons))


@pytest.mark.parametrize("case", API_CASES, ids=[_api_id(c) for c in API_CASES])
def test_public_api_float64_parity(backend, case, gen):
    shape, kwargs, compiled_only = case
    _skip_unreachable(backend, kwargs["bins"])
    if compiled_only and not backend.compiled:
        pytest.skip(f"not run on {backend.id}: too slow")
    pred = torch.rand(shape, dtype=torch.float64, generator=gen)
    target = torch.rand(shape, dtype=torch.float64, generator=gen)
    if not kwargs.get("clamp", True):
        pred = 1.4 * pred - 0.2
    results = {}
    grad_out = None
    for name, device in (("reference", torch.device("cpu")), (backend.name, backend.device)):
        p = pred.to(device).requires_grad_()
        loss = entropy_kernels.spatial_entropy_loss(p, target.to(device), backend=name,
                                                    generator=torch.Generator().manual_seed(7), **kwargs)
        if grad_out is None:  # not 1, and for a map not uniform
            grad_out = torch.randn(loss.shape, generator=gen, dtype=torch.float64) + 2.0
        (grad,) = torch.autograd.grad(loss, p, grad_out.to(device))
        results[name] = (loss.detach(), grad)
    for what, got, expected in zip(("loss", "gradient"), results[backend.name], results["reference"]):
        testing.assert_float64_parity(got, expected, backend.name, what)


def test_public_api_takes_non_contiguous_input(backend, gen):
    """A transposed view (as a channels-last or cropped batch gives) is the same loss and gradient."""
    _skip_unreachable(backend, 6)
    if backend.id in NOT_INTERPRETED:
        pytest.skip(f"not run on {backend.id}: too slow")
    pred = torch.rand(2, 2, 7, 9, dtype=torch.float64, generator=gen).to(backend.device)
    target = torch.rand(2, 2, 7, 9, dtype=torch.float64, generator=gen).to(backend.device)
    kwargs = dict(bins=6, window=3, neighbor_weights="mean", reduction="none")
    results = []
    for p, t in ((pred.transpose(2, 3), target.transpose(2, 3)),
                 (pred.transpose(2, 3).contiguous(), target.transpose(2, 3).contiguous())):
        p = p.detach().requires_grad_()
        loss = entropy_kernels.spatial_entropy_loss(p, t, backend=backend.name, **kwargs)
        (grad,) = torch.autograd.grad(loss, p, torch.linspace(-1, 2, loss.numel(), dtype=loss.dtype,
                                                              device=loss.device).reshape(loss.shape))
        results.append((loss, grad))
    for got, expected in zip(*results):
        testing.assert_float64_parity(got, expected, backend.name)
