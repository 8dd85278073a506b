"""What is specific to the Triton backend: its algorithms and variants, the fused forward, the
bandwidth's reciprocal, its ops under opcheck and torch.compile, half inputs and its refusals.
tests/test_contract.py holds the contract every backend meets.

Without a GPU the kernels run in Triton's interpreter on CPU tensors, which is slow, so the
shapes here are tiny; with a GPU the same tests run the compiled kernels on CUDA tensors.
tests/conftest.py sets TRITON_INTERPRET before Triton is imported (kernels are bound at decoration time).
"""
import dataclasses

import pytest
import torch

pytest.importorskip("triton")

from entropy_kernels import reference, spatial_entropy_loss, testing  # noqa: E402
from entropy_kernels.ops import triton_kde  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_REASONS = triton_kde.not_supported_reasons(DEVICE, torch.float32, 8)
needs_triton = pytest.mark.skipif(bool(_REASONS), reason="; ".join(_REASONS))
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def random_maps(gen, n, height, width, bins, low=0.0, high=None):
    """u_pred, m_pred, u_tgt, m_tgt in bin units, float64 on DEVICE."""
    high = bins - 1 if high is None else high
    return [
        (low + (high - low) * torch.rand(n, height, width, dtype=torch.float64, generator=gen)).to(DEVICE)
        for _ in range(4)
    ]


def divergence_and_grads(backend, maps, options, grad_d, dtype):
    u_pred, m_pred, u_tgt, m_tgt = (x.detach().to(dtype, copy=True) for x in maps)
    u_pred.requires_grad_()
    m_pred.requires_grad_()
    d = backend.local_divergence(u_pred, m_pred, u_tgt, m_tgt, *options)
    grad_u, grad_m = torch.autograd.grad(d, (u_pred, m_pred), grad_d.to(dtype))
    return [t.double() for t in (d, grad_u, grad_m)]


def test_mismatched_maps_are_an_error():
    maps = [torch.zeros(1, 4, 4, dtype=torch.float64, device=DEVICE) for _ in range(4)]
    maps[2] = maps[2].float()
    with pytest.raises(ValueError, match="one shape, dtype and device"):
        triton_kde.local_divergence(*maps, 3, 3, False, 4, 0.5, "logistic", "kl", 1e-10)


def test_not_supported_reasons(monkeypatch):
    assert triton_kde.not_supported_reasons(torch.device("cpu"), torch.float16, 8)
    assert "bins" in " ".join(triton_kde.not_supported_reasons(DEVICE, torch.float32, 65))
    assert triton_kde.not_supported_reasons(torch.device("meta"), torch.float32, 8)
    if not _REASONS:
        for bins in (2, 17, 64):
            for dtype in (torch.float32, torch.float64):
                assert triton_kde.not_supported_reasons(DEVICE, dtype, bins) == []
    monkeypatch.setattr(triton_kde, "_INTERPRETED", False)  # kernels compiled for the GPU
    assert "TRITON_INTERPRET" in " ".join(triton_kde.not_supported_reasons(torch.device("cpu"), torch.float32, 8))


@pytest.mark.skipif(not triton_kde._INTERPRETED, reason="counts calls in Triton's interpreter")
def test_backward_shares_the_column_its_two_window_states_cross(gen, monkeypatch):
    """At each column the backward's leading window state leaves the column its lagging state then
    enters; a one-column cache computes that sum once: three column sums per window, not four."""
    calls = []
    column_sums = triton_kde._column_sums

    class Counting:  # the interpreter calls a kernel's helpers through the module's globals
        def __call__(self, *args, **kwargs):
            calls.append(args[7])  # the column x
            return column_sums(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(column_sums, name)

    monkeypatch.setattr(triton_kde, "_column_sums", Counting())
    width, win_w = 40, 3
    maps = random_maps(gen, 1, 1, width, 8)
    options = (1, win_w, False, 8, 0.5, "logistic", "kl", 1e-10)

    def count(fuse, grad_d):
        u_pred, m_pred = (x.clone().requires_grad_() for x in maps[:2])
        calls.clear()
        d = triton_kde.local_divergence(u_pred, m_pred, *maps[2:], *options,
                                        _variant=triton_kde._Variant(fuse_forward=fuse))
        forward = len(calls)
        calls.clear()
        d.backward(grad_d(d))
        return forward, len(calls)

    forward, backward = count(False, lambda d: torch.randn(d.shape, generator=gen, dtype=d.dtype).to(DEVICE))
    assert forward == width + (width - 1 - win_w // 2)  # every column entered once, all but the last ones left
    # The leading state alone costs what the forward did; the lagging one adds one sum per column
    # (its leaving one) where without the cache it would add two (about 2 * forward in all).
    assert forward < backward <= forward + width, (forward, backward)
    # Fused: the forward is the backward kernel, and a uniform grad_output needs no column sum after it.
    assert count(True, lambda d: torch.full_like(d, 0.25)) == (backward, 0)
    assert count(True, lambda d: torch.rand(d.shape, generator=gen, dtype=d.dtype).to(DEVICE)) == (backward, backward)


@pytest.fixture
def uncached_params():
    """triton_kde._params caches (h or 1/h, eps) per bandwidth; a test that changes the rule empties it."""
    triton_kde._params.cache_clear()
    yield
    triton_kde._params.cache_clear()


def test_reciprocal_bandwidth_rule():
    for h in (0.5, 1.0, 2.0, 0.25, 2.0**-20):
        assert triton_kde._reciprocal_h(h), h
    for h in (0.3, 0.7, 0.75, 1.5, 3.0, 1e-3, 0.0, -0.5, 2.0**-130):
        assert not triton_kde._reciprocal_h(h), h


@needs_triton
@pytest.mark.parametrize("kernel,bandwidth,dtype", [("logistic", 0.5, torch.float32),
                                                    ("gaussian", 0.25, torch.float32),
                                                    ("logistic", 2.0, torch.float64)])
def test_power_of_two_bandwidth_times_its_reciprocal_is_bit_for_bit(gen, kernel, bandwidth, dtype, monkeypatch,
                                                                    uncached_params):
    """With h a power of two the kernels multiply by 1/h where they would divide by h (one IEEE
    division fewer per kernel value): the same floats for D and both gradients, values beyond the
    bins included, except where a kernel value is subnormal (below 1.2e-38 in float32, where x / y
    rounds before the scaling by 1/h): such a value moves by a subnormal ulp, and a gradient by that
    times the window's 1 / (Q + eps), up to ~1e-35, twenty-odd orders below the map's largest value."""
    maps = random_maps(gen, 1, 6, 7, 12, low=-4.0, high=15.0)
    options = (5, 3, False, 12, bandwidth, kernel, "kl", 1e-10)
    grad_d = torch.randn(1, 6, 7, dtype=torch.float64, generator=gen).to(DEVICE)
    assert triton_kde._reciprocal_h(bandwidth)
    times = divergence_and_grads(triton_kde, maps, options, grad_d, dtype)
    monkeypatch.setattr(triton_kde, "_reciprocal_h", lambda h: False)
    triton_kde._params.cache_clear()
    divided = divergence_and_grads(triton_kde, maps, options, grad_d, dtype)
    for name, a, b in zip(("D", "grad_u", "grad_m"), times, divided):
        differ = a != b
        assert not differ.any() or (a - b).abs().max() <= 1e-20 * a.abs().max(), \
            f"{name}: max difference {(a - b).abs().max().item():.3g} against values up to {a.abs().max().item():.3g}"
        assert differ.float().mean() < 0.1, f"{name}: {differ.sum().item()} of {a.numel()} values differ"
    assert times[1].abs().max() > 1e-4  # the gradients are not trivially equal


@needs_triton
@pytest.mark.parametrize("with_grad", [False, True])
def test_opcheck(gen, with_grad):
    u_pred, m_pred, u_tgt, m_tgt = random_maps(gen, 1, 3, 4, 6)
    options = (3, 3, False, 6, 0.5, "logistic", "kl", 1e-10)
    args = (u_pred.clone().requires_grad_(), m_pred.clone().requires_grad_(), u_tgt, m_tgt, *options, with_grad)
    torch.library.opcheck(triton_kde.triton_local_divergence, args)
    d, grad_u1, grad_m1 = triton_kde.triton_local_divergence(u_pred, m_pred, u_tgt, m_tgt, *options, with_grad)
    assert grad_u1.numel() == (u_pred.numel() if with_grad else 0)
    for grad_d in (torch.randn(1, 3, 4, dtype=torch.float64, generator=gen).to(DEVICE), torch.full_like(d, 0.3)):
        torch.library.opcheck(triton_kde.triton_local_divergence_backward,
                              (grad_d, d, u_pred, m_pred, u_tgt, m_tgt, grad_u1, grad_m1, *options))


@needs_triton
@pytest.mark.parametrize("divergence", ["kl", "hellinger"])
def test_fused_forward_and_its_rescaled_gradient(gen, divergence):
    """With a gradient to come, the forward runs the backward kernel for grad_output = 1 and stores
    D as it goes: the same D as the plain forward, and for a uniform grad_output the rescaled
    gradient matches the backward kernel's; a non-uniform grad_output runs the backward kernel."""
    maps = random_maps(gen, 2, 5, 8, 7)
    maps[0][0, 1, 2] = float("nan")  # a poisoned region: NaN in D and in the gradient under it
    options = (3, 5, False, 7, 0.5, "gaussian", divergence, 1e-6)
    u_pred, m_pred = (x.clone().requires_grad_() for x in maps[:2])
    d = triton_kde.local_divergence(u_pred, m_pred, *maps[2:], *options)
    with torch.no_grad():
        plain = triton_kde.local_divergence(*maps, *options)
    torch.testing.assert_close(d, plain, rtol=0, atol=0, equal_nan=True)
    assert d.isnan().any() and not d.isnan().all()
    fused = torch.autograd.grad(d, (u_pred, m_pred), torch.full_like(d, -0.7))
    u2, m2 = (x.clone().requires_grad_() for x in maps[:2])
    d2 = triton_kde.local_divergence(u2, m2, *maps[2:], *options, _variant=triton_kde._Variant(fuse_forward=False))
    separate = torch.autograd.grad(d2, (u2, m2), torch.full_like(d2, -0.7))
    for a, b in zip(fused, separate):
        # Within rounding: G_c is formed with g = 1 and scaled at the end, and T slides in float64.
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10 * b.nan_to_num().abs().max().item(), equal_nan=True)
        assert a.isnan().any() and (a.isnan() == b.isnan()).all()
    expected = divergence_and_grads(reference, maps, options, torch.full_like(d, -0.7), torch.float64)
    for a, e in zip(fused, expected[1:]):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-7 * e.nan_to_num().abs().max().item(), equal_nan=True)


def loss_and_grad(pred, target, grad_out, backend, **kwargs):
    pred = pred.clone().requires_grad_()
    kwargs.setdefault("neighbor_weights", "shuffled")
    loss = spatial_entropy_loss(pred, target, backend=backend, generator=torch.Generator().manual_seed(7), **kwargs)
    (grad,) = torch.autograd.grad(loss, pred, grad_out)
    return loss, grad


@needs_triton
def test_half_input_is_computed_in_float32(gen):
    pred = torch.rand(1, 3, 5, 4, generator=gen).half().to(DEVICE)
    target = torch.rand(1, 3, 5, 4, generator=gen).half().to(DEVICE)
    kwargs = dict(bins=8, window=3)
    loss, grad = loss_and_grad(pred, target, None, "triton", **kwargs)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float16
    expected, expected_grad = loss_and_grad(pred.double(), target.double(), None, "reference", **kwargs)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    # The gradient is rounded to float16 on its way back to pred.
    torch.testing.assert_close(grad.double(), expected_grad, rtol=2e-3, atol=1e-6)


@needs_triton
def test_nan_and_inf_reach_exactly_the_windows_that_contain_them(gen):
    pred = torch.rand(1, 2, 7, 6, dtype=torch.float64, generator=gen).to(DEVICE)
    target = torch.rand(1, 2, 7, 6, dtype=torch.float64, generator=gen).to(DEVICE)
    pred[0, 0, 1, 1] = float("nan")
    target[0, 1, 5, 4] = float("inf")
    kwargs = dict(bins=6, window=3, reduction="none", neighbor_weights="mean")
    got = spatial_entropy_loss(pred, target, backend="triton", **kwargs)
    expected = spatial_entropy_loss(pred, target, backend="reference", **kwargs)
    assert got.isnan().any() and got.isfinite().any()
    assert torch.equal(got.isnan(), expected.isnan())
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-13, equal_nan=True)
    assert spatial_entropy_loss(pred, target, backend="triton", bins=6, window=3).isnan()


@needs_triton
def test_identical_images(gen):
    """P = Q: zero generalised KL, Hellinger sqrt(eps/2), and exactly zero gradients (dD/dQ = 0)."""
    image = torch.rand(2, 1, 4, 5, dtype=torch.float64, generator=gen).to(DEVICE)
    eps = 1e-10
    for divergence, value in (("kl", 0.0), ("hellinger", (eps / 2) ** 0.5)):
        pred = image.clone().requires_grad_()
        d = spatial_entropy_loss(pred, image, backend="triton", bins=7, window=3, divergence=divergence,
                                 eps=eps, reduction="none")
        torch.testing.assert_close(d, torch.full_like(d, value), rtol=1e-9, atol=1e-15)
        d.sum().backward()
        assert torch.equal(pred.grad, torch.zeros_like(pred.grad)), divergence


@needs_triton
def test_torch_compile(gen):
    u_pred, m_pred, u_tgt, m_tgt = random_maps(gen, 2, 5, 4, 6)
    options = (3, 3, False, 6, 0.5, "logistic", "kl", 1e-10)

    def loss(u, m):
        return triton_kde.local_divergence(u, m, u_tgt, m_tgt, *options).square().sum()

    # Inductor's CPU code generation is not what is tested here; aot_eager traces the op through
    # its fake implementation and autograd registration, which is what torch.compile relies on.
    compiled = torch.compile(loss, backend="inductor" if DEVICE.type == "cuda" else "aot_eager", fullgraph=True)
    results = []
    for fn in (loss, compiled):
        u, m = u_pred.clone().requires_grad_(), m_pred.clone().requires_grad_()
        value = fn(u, m)
        results.append((value, *torch.autograd.grad(value, (u, m))))
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


@needs_cuda
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_gradients_stable_across_runs(gen, dtype):
    """Backward adds into the gradient maps with atomics: run-to-run differences are rounding only."""
    maps = random_maps(gen, 6, 40, 33, 32)
    options = (11, 11, False, 32, 0.5, "logistic", "kl", 1e-10)
    grad_d = torch.randn(6, 40, 33, dtype=torch.float64, generator=gen).to(DEVICE)
    first = divergence_and_grads(triton_kde, maps, options, grad_d, dtype)
    expected = divergence_and_grads(reference, maps, options, grad_d, torch.float64)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-13)
    for _ in range(3):
        again = divergence_and_grads(triton_kde, maps, options, grad_d, dtype)
        assert torch.equal(again[0], first[0])  # forward has no atomics: bitwise equal
        for g, f in zip(again[1:], first[1:]):
            torch.testing.assert_close(g, f, **tol)
    for g, e in zip(first, expected):
        # float64 against the reference: the sliding sums' error; run to run the atomics' order
        # alone differs, as above.
        if dtype == torch.float32:
            torch.testing.assert_close(g, e, **tol)
        else:
            strict = dataclasses.replace(testing.contract("triton").float64, rtol=tol["rtol"])
            testing.assert_float64_parity(g, e, "triton", tolerance=strict)


@needs_triton
@pytest.mark.parametrize("algorithm", triton_kde.ALGORITHMS)
def test_both_algorithms_match_the_reference(gen, algorithm):
    """'slide' (the default) and 'strip' (kept to be timed against it on a GPU) on one odd case."""
    maps = random_maps(gen, 2, 6, 9, 10)
    options = (3, 5, False, 10, 0.5, "logistic", "kl", 1e-10)
    grad_d = torch.randn(2, 6, 9, dtype=torch.float64, generator=gen).to(DEVICE)
    expected = divergence_and_grads(reference, maps, options, grad_d, torch.float64)
    got = divergence_and_grads(triton_kde, maps, (*options, triton_kde._Variant(algorithm=algorithm)), grad_d,
                               torch.float64)
    for name, g, e in zip(("D", "grad_u", "grad_m"), got, expected):
        testing.assert_float64_parity(g, e, "triton", f"{algorithm} {name}")


def test_unknown_algorithm_is_an_error():
    with pytest.raises(ValueError, match="algorithm must be one of .*'bogus'"):
        triton_kde._Variant(algorithm="bogus")


def test_a_variant_travels_through_the_ops_as_its_key():
    variant = triton_kde._Variant(algorithm="strip", fuse_forward=False, launch=(("num_warps", 4),))
    assert triton_kde._variant_of(variant.key()) == variant
    assert triton_kde._Variant().key() == "" and triton_kde._variant_of("") == triton_kde._Variant()
