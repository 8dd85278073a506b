"""backend='cpp' (and 'cuda' where a GPU is present) against the float64 reference.

The extension is built (or imported) once per test session by the first test that needs it.
"""
from __future__ import annotations

import pytest
import torch

import entropy_kernels
from entropy_kernels import reference
from entropy_kernels.ops import _extension


def _backend(name):
    from entropy_kernels import backends

    module, error = backends._load(name)
    assert module is not None, error
    return module


@pytest.fixture(scope="session")
def cpp():
    module = _backend("cpp")
    reasons = module.not_supported_reasons(torch.device("cpu"), torch.float32, 32)
    assert not reasons, f"the C++ extension must build on every CI machine: {reasons}"
    return module


def assert_close_f64(actual, expected):
    """float64 agreement, to ~1e-6 of the largest value.

    Sliding window sums (add the entering pixels, subtract the leaving ones) carry an absolute
    error of ~1e-16 x the band's largest cell, where the reference's direct sums keep full
    relative precision even for cells far below eps; log(Q + eps) and P / (Q + eps) then differ
    by up to ~1e-16 / eps = 1e-6 relative in cells with Q << eps (docs/cpu.md). A wrong index
    or formula gives errors of order one.
    """
    actual = actual.detach().cpu()
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6 * scale + 1e-12)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def impl_for(device):
    return _backend("cpp" if device == "cpu" else "cuda")


def random_maps(n, height, width, bins, dtype=torch.float64, device="cpu", spread=1.0, seed=None):
    """u, m maps of pred and target in bin units (a little outside [0, L-1] too, as clamp=False allows)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    maps = [
        ((torch.rand(n, height, width, generator=gen, dtype=torch.float64) * 1.1 - 0.05) * (bins - 1) * spread)
        for _ in range(4)
    ]
    return [m.to(device=device, dtype=dtype).contiguous() for m in maps]


def values_and_grads(impl, maps, args, grad_out=None):
    u, m, ut, mt = [t.detach().clone() for t in maps]
    u.requires_grad_(True)
    m.requires_grad_(True)
    d = impl.local_divergence(u, m, ut, mt, *args)
    if grad_out is None:
        grad_out = torch.rand_like(d) * 2 - 0.5  # not 1, some negative
    elif isinstance(grad_out, float):  # uniform, as the 'mean' and 'sum' reductions send it
        grad_out = torch.full_like(d, grad_out)
    gu, gm = torch.autograd.grad(d, (u, m), grad_out)
    return d.detach(), gu, gm, grad_out


def check_parity_f64(impl, case, grad_out=None, device="cpu", maps=None):
    """D and both gradients of impl against the float64 reference for one case (planes, H, W,
    bins, win_h, win_w, valid, kernel, divergence), on fresh random maps unless given, with a
    random grad_output or grad_out (a float: uniform). Returns the maps."""
    n, height, width, bins, win_h, win_w, valid, kernel, divergence = case
    args = (win_h, win_w, valid, bins, 0.5, kernel, divergence, 1e-10)
    if maps is None:
        maps = random_maps(n, height, width, bins)
    d_ref, gu_ref, gm_ref, g = values_and_grads(reference, maps, args, grad_out)
    d, gu, gm, _ = values_and_grads(impl, [t.to(device) for t in maps], args, g.to(device))
    assert_close_f64(d, d_ref)
    assert_close_f64(gu, gu_ref)
    assert_close_f64(gm, gm_ref)
    return maps


# (planes, H, W, bins, win_h, win_w, valid, kernel, divergence): odd sizes, images smaller than
# the window, bins not a power of two, rectangular and global windows, both paddings, both
# kernels, both divergences.
CASES = [
    (2, 9, 7, 5, 3, 3, False, "logistic", "kl"),
    (1, 8, 10, 6, 5, 3, True, "gaussian", "hellinger"),
    (3, 5, 4, 7, 11, 11, False, "logistic", "hellinger"),  # image smaller than the window
    (1, 6, 4, 3, 6, 4, True, "logistic", "kl"),  # global window of an even-sized image
    (2, 7, 13, 12, 1, 1, False, "gaussian", "kl"),
    (1, 13, 11, 9, 5, 7, False, "gaussian", "kl"),
    (2, 12, 9, 10, 3, 5, True, "logistic", "hellinger"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:6])) + f"-{c[6]}-{c[7]}-{c[8]}")
def test_contract_parity_float64(cpp, device, case):
    check_parity_f64(impl_for(device), case, device=device)


# CPU-only layouts of the backward's scratch: bins above 64 (the contraction in strips of 64
# bins), bins 16, 32 and 64 (the window pass compiled for them), bins 8 to 64 in multiples of 8
# (an item's first row summed in registers), a global window over a tall image (kernel factors
# computed per column instead of kept per row), and a plane split into several row items.
CPU_CASES = [
    (1, 6, 5, 70, 3, 3, False, "gaussian", "kl"),
    (1, 7, 6, 64, 3, 5, False, "logistic", "kl"),  # 16, 32, 64 bins: the window pass's compiled sizes
    (2, 9, 8, 32, 5, 3, True, "gaussian", "hellinger"),
    (1, 8, 9, 16, 3, 3, False, "logistic", "hellinger"),
    (2, 7, 9, 8, 5, 3, False, "gaussian", "kl"),  # 8 bins: the first row's column sums, one vector per row
    (1, 70, 3, 4, 70, 3, True, "logistic", "kl"),
    (2, 70, 4, 5, 3, 5, False, "logistic", "hellinger"),
]


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: "x".join(map(str, c[:6])) + f"-{c[6]}-{c[7]}-{c[8]}")
def test_contract_parity_float64_cpu_layouts(cpp, case):
    maps = check_parity_f64(cpp, case)
    # and the forward's own gradient (grad_output uniform), which the backward rescales
    check_parity_f64(cpp, case, grad_out=0.75, maps=maps)


def _err(x, ref):
    return (x.double() - ref).abs().max().item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", ["kl", "hellinger"])
@pytest.mark.parametrize("kernel", ["logistic", "gaussian"])
def test_float32_error_within_twice_reference_float32_error(cpp, device, divergence, kernel):
    """flash-attention's rule: error vs float64 at most ~2x that of the reference run in float32."""
    bins = 16
    args = (7, 7, False, bins, 0.5, kernel, divergence, 1e-10)
    maps64 = random_maps(2, 19, 17, bins)
    d64, gu64, gm64, g = values_and_grads(reference, maps64, args)
    maps32 = [t.float() for t in maps64]
    d_r, gu_r, gm_r, _ = values_and_grads(reference, maps32, args, g.float())
    d_c, gu_c, gm_c, _ = values_and_grads(impl_for(device), [t.to(device) for t in maps32], args, g.float().to(device))
    assert d_c.dtype == torch.float32
    for name, ours, theirs, exact in (("D", d_c, d_r, d64), ("grad_u", gu_c, gu_r, gu64), ("grad_m", gm_c, gm_r, gm64)):
        scale = exact.abs().max().item()
        assert _err(ours.cpu(), exact) <= 2 * _err(theirs, exact) + 1e-6 * scale, name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", ["kl", "hellinger"])
@pytest.mark.parametrize("kernel", ["logistic", "gaussian"])
def test_float32_arithmetic_error_within_twice_reference_float32(cpp, device, divergence, kernel):
    """The same rule with the float64 reference run on the float32 inputs themselves.

    Against unrounded float64 inputs, the rounding of the inputs dominates both errors; here
    only the arithmetic counts (the backward's float32 contraction included), bins 32 window 11.
    """
    check_float32_arithmetic_rule(impl_for(device), kernel, divergence, 23, 29, device)


def check_float32_arithmetic_rule(impl, kernel, divergence, height, width, device="cpu"):
    """impl in float32 against the float64 reference on the same float32 inputs: error at most
    twice the reference's own float32 error, for D and both gradients (bins 32, window 11)."""
    bins = 32
    args = (11, 11, False, bins, 0.5, kernel, divergence, 1e-10)
    maps32 = [t.float() for t in random_maps(2, height, width, bins)]
    maps64 = [t.double() for t in maps32]
    g = (torch.rand(2, height, width) * 2 - 0.5).double()
    d64, gu64, gm64, _ = values_and_grads(reference, maps64, args, g)
    d_r, gu_r, gm_r, _ = values_and_grads(reference, maps32, args, g.float())
    d_c, gu_c, gm_c, _ = values_and_grads(impl, [t.to(device) for t in maps32], args, g.float().to(device))
    assert d_c.dtype == torch.float32
    for name, ours, theirs, exact in (("D", d_c, d_r, d64), ("grad_u", gu_c, gu_r, gu64), ("grad_m", gm_c, gm_r, gm64)):
        assert _err(ours.cpu(), exact) <= 2 * _err(theirs, exact), name


@pytest.mark.parametrize("window", [5, (1, 3, 5), "global"])
@pytest.mark.parametrize("channels", [1, 3])
def test_public_api_parity(cpp, channels, window):
    gen = torch.Generator().manual_seed(channels * 7 + len(str(window)))
    pred = torch.rand(2, channels, 9, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.rand(2, channels, 9, 11, generator=gen, dtype=torch.float64)
    kw = dict(bins=12, window=window, neighbor_weights="random", reduction="none")
    out = {}
    for backend in ("reference", "cpp"):
        loss = entropy_kernels.spatial_entropy_loss(
            pred, target, backend=backend, generator=torch.Generator().manual_seed(3), **kw
        )
        weight = torch.linspace(-1, 2, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
        (grad,) = torch.autograd.grad((loss * weight).sum(), pred)
        out[backend] = (loss.detach(), grad)
    assert_close_f64(out["cpp"][0], out["reference"][0])
    assert_close_f64(out["cpp"][1], out["reference"][1])


def test_public_api_three_dim_input_and_valid(cpp):
    pred = torch.rand(3, 10, 8, dtype=torch.float64, requires_grad=True)
    target = torch.rand(3, 10, 8, dtype=torch.float64)
    kw = dict(bins=10, window=3, padding="valid", divergence="hellinger", kernel="gaussian", neighbor_weights="mean")
    ref = entropy_kernels.spatial_entropy_loss(pred, target, backend="reference", **kw)
    ours = entropy_kernels.spatial_entropy_loss(pred, target, backend="cpp", **kw)
    assert_close_f64(ours, ref.detach())
    (g_ref,) = torch.autograd.grad(ref * 3.0, pred)
    (g_ours,) = torch.autograd.grad(ours * 3.0, pred)
    assert_close_f64(g_ours, g_ref)


def test_auto_picks_cpp_for_cpu(cpp):
    assert entropy_kernels.available_backends()["cpu"]["cpp"].available
    pred, target = torch.rand(1, 1, 6, 6), torch.rand(1, 1, 6, 6)
    kw = dict(bins=8, window=3, neighbor_weights="mean")
    auto = entropy_kernels.spatial_entropy_loss(pred, target, backend="auto", **kw)
    assert torch.equal(auto, entropy_kernels.spatial_entropy_loss(pred, target, backend="cpp", **kw))


@pytest.mark.parametrize("divergence", ["kl", "hellinger"])
@pytest.mark.parametrize("valid", [False, True])
def test_gradcheck_float64(cpp, divergence, valid):
    bins = 5
    u, m, ut, mt = random_maps(2, 6, 5, bins)
    u.requires_grad_(True)
    m.requires_grad_(True)

    def f(u_, m_):
        return cpp.local_divergence(u_, m_, ut, mt, 3, 3, valid, bins, 0.7, "logistic", divergence, 1e-10)

    assert torch.autograd.gradcheck(f, (u, m), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_identical_inputs_give_zero_divergence_and_gradient(cpp):
    """P = Q gives D = 0 and dD/dQ = -P/(P + eps) ~ -1, so the gradient is minus the derivative of the
    total mass, which is constant for values well inside the bin range (a Gaussian kernel with
    h = 1 has a partition-of-unity ripple of ~1e-8)."""
    bins = 16
    gen = torch.Generator().manual_seed(0)
    u, m = [4 + torch.rand(2, 7, 9, generator=gen, dtype=torch.float64) * (bins - 9) for _ in range(2)]
    d, gu, gm, _ = values_and_grads(cpp, [u, m, u, m], (5, 5, False, bins, 1.0, "gaussian", "kl", 1e-10))
    assert d.abs().max() < 1e-9
    assert gu.abs().max() < 1e-5 and gm.abs().max() < 1e-5
    _, gu_far, _, _ = values_and_grads(cpp, [u, m, u + 1, m], (5, 5, False, bins, 1.0, "gaussian", "kl", 1e-10))
    assert gu_far.abs().max() > 1e-2  # the same call does see a real difference


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("where", [0, 3])
def test_nan_map_gives_nan_in_exactly_the_affected_windows(cpp, device, where):
    bins = 6
    maps = random_maps(1, 9, 10, bins)
    maps[where][0, 2, 7] = float("nan")  # a pred intensity or a target neighbour value
    args = (3, 3, False, bins, 0.5, "logistic", "kl", 1e-10)
    d_ref = reference.local_divergence(*maps, *args)
    impl = impl_for(device)
    u, m = maps[0].clone().to(device).requires_grad_(True), maps[1].clone().to(device).requires_grad_(True)
    d = impl.local_divergence(u, m, maps[2].to(device), maps[3].to(device), *args)
    assert torch.equal(torch.isnan(d.detach().cpu()), torch.isnan(d_ref))
    assert torch.isnan(d).sum() == 9  # the 3x3 windows containing the pixel
    finite = torch.isfinite(d_ref)
    assert_close_f64(d.detach().cpu()[finite], d_ref[finite])
    gu, gm = torch.autograd.grad(d.sum(), (u, m))
    # Pixels under a NaN window get NaN gradients (25 = the 5x5 block around the pixel); the others stay finite.
    assert torch.isnan(gu).sum() == 25 and torch.isnan(gm).sum() == 25


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_image_gives_nan_loss(cpp, bad):
    pred, target = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    target[1, 2, 3, 3] = bad
    loss = entropy_kernels.spatial_entropy_loss(pred, target, bins=8, window=3, backend="cpp")
    assert torch.isnan(loss)
    per_window = entropy_kernels.spatial_entropy_loss(pred, target, bins=8, window=3, backend="cpp", reduction="none")
    assert torch.isfinite(per_window[0]).all() and torch.isnan(per_window[1, 2]).any()


def test_nan_grad_output_poisons_only_its_window_pixels(cpp):
    bins = 6
    maps = random_maps(1, 8, 8, bins)
    args = (3, 3, False, bins, 0.5, "gaussian", "hellinger", 1e-10)
    d_ref, gu_ref, gm_ref, g = values_and_grads(reference, maps, args)
    g[0, 4, 4] = float("nan")
    _, gu_ref, _, _ = values_and_grads(reference, maps, args, g)
    _, gu, _, _ = values_and_grads(cpp, maps, args, g)
    assert torch.equal(torch.isnan(gu), torch.isnan(gu_ref))
    assert torch.isnan(gu).sum() == 9


def test_result_does_not_depend_on_thread_count(cpp):
    bins = 16
    # Several planes and enough rows for several work items per plane.
    maps = random_maps(3, 70, 23, bins, dtype=torch.float32)
    args = (5, 5, False, bins, 0.5, "logistic", "kl", 1e-10)
    g = torch.rand(3, 70, 23)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(values_and_grads(cpp, maps, args, g)[:3])
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("divergence", ["kl", "hellinger"])
def test_uniform_grad_output_reuses_the_forward_gradient(cpp, device, divergence):
    """With a uniform grad_output ('mean'/'sum') the backward rescales the gradient that the forward
    computed for grad_output = 1; it must match the full backward and the reference. (On CUDA that
    forward is the backward kernel's fused pass.)"""
    bins = 9
    args = (5, 3, False, bins, 0.5, "gaussian", divergence, 1e-10)
    maps = random_maps(2, 11, 8, bins)
    maps[0][1, 5, 5] = float("nan")
    g = torch.full((2, 11, 8), -0.37, dtype=torch.float64)
    d_ref, gu_ref, gm_ref, _ = values_and_grads(reference, maps, args, g)
    impl = impl_for(device)
    d, gu, gm, _ = values_and_grads(impl, [t.to(device) for t in maps], args, g.to(device))  # forward with gradient
    d, gu, gm = d.cpu(), gu.cpu(), gm.cpu()
    ids = (_extension.KERNEL_IDS["gaussian"], _extension.DIVERGENCE_IDS[divergence])
    u, m = (maps[i].clone().to(device).requires_grad_(True) for i in (0, 1))
    d_full, gu_full_1, gm_full_1 = impl.local_divergence_op(u, m, maps[2].to(device), maps[3].to(device), 5, 3, False,
                                                            bins, 0.5, *ids, 1e-10, False)
    gu_full, gm_full = (t.cpu() for t in torch.autograd.grad(d_full, (u, m), g.to(device)))  # the full backward
    d_full = d_full.detach().cpu()
    assert gu_full_1.numel() == 0 and gm_full_1.numel() == 0
    assert torch.equal(torch.isnan(d), torch.isnan(d_ref)) and torch.equal(torch.isnan(d), torch.isnan(d_full))
    assert torch.equal(torch.isnan(gu), torch.isnan(gu_full)) and torch.isnan(gu).sum() == 9 * 5  # windows 5x3: rows 1..9, columns 3..7
    ok = ~torch.isnan(gu)
    assert_close_f64(gu[ok], gu_full[ok])
    assert_close_f64(gm[ok], gm_full[ok])
    assert_close_f64(gu[ok], gu_ref[ok])
    assert_close_f64(gm[ok], gm_ref[ok])
    assert_close_f64(d[~torch.isnan(d)], d_ref[~torch.isnan(d)])


def test_opcheck(cpp):
    bins = 6
    u, m, ut, mt = random_maps(2, 7, 6, bins)
    u.requires_grad_(True)
    m.requires_grad_(True)
    for with_grad in (False, True):
        torch.library.opcheck(cpp.local_divergence_op, (u, m, ut, mt, 3, 3, False, bins, 0.5, 0, 0, 1e-10, with_grad))
        torch.library.opcheck(cpp.local_divergence_op, (u, m, ut, mt, 5, 3, True, bins, 0.5, 1, 1, 1e-10, with_grad))


def test_eps_below_the_sliding_sums_floor_goes_to_the_reference():
    """Sliding window sums carry ~1e-17 absolute error; at eps = 0 the Gaussian kernel's far cells
    gave NaN windows. The fused backends decline eps < 1e-12 and 'auto' takes the reference."""
    pred = torch.rand(1, 1, 9, 8, dtype=torch.float64)
    target = torch.rand(1, 1, 9, 8, dtype=torch.float64)
    kw = dict(bins=12, window=5, kernel="gaussian", eps=0.0, neighbor_weights="mean")
    with pytest.raises(ValueError, match="eps >= 1e-12.*eps=0"):
        entropy_kernels.spatial_entropy_loss(pred, target, backend="cpp", **kw)
    with pytest.warns(UserWarning, match="uses 'reference'.*eps"):
        auto = entropy_kernels.spatial_entropy_loss(pred, target, backend="auto", **kw)
    ref = entropy_kernels.spatial_entropy_loss(pred, target, backend="reference", **kw)
    assert torch.isfinite(ref) and torch.equal(auto, ref)
    # at the floor the fused sums are still float32-accurate
    kw["eps"] = 1e-12
    fused = entropy_kernels.spatial_entropy_loss(pred, target, backend="cpp", **kw)
    torch.testing.assert_close(fused, entropy_kernels.spatial_entropy_loss(pred, target, backend="reference", **kw),
                               rtol=1e-6, atol=0)


def test_bad_arguments_raise(cpp):
    module, _ = _extension.load(False)
    u = torch.rand(1, 4, 4)
    with pytest.raises(RuntimeError, match="does not fit"):
        module.forward(u, u, u, u, 5, 5, True, 4, 0.5, 0, 0, 1e-10, False)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        h = u.half()
        module.forward(h, h, h, h, 3, 3, False, 4, 0.5, 0, 0, 1e-10, False)
    assert cpp.not_supported_reasons(torch.device("cpu"), torch.float16, 8)
    assert cpp.not_supported_reasons(torch.device("cuda"), torch.float32, 8)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(dtype=torch.float16), TypeError, "float32 or float64"),
        (dict(win=(0, 3)), ValueError, "window sides"),
        (dict(win=(5, 5), valid=True), ValueError, "does not fit"),
        (dict(bins=1), ValueError, "bins must be >= 2"),
        (dict(bandwidth=0.0), ValueError, "bandwidth"),
        (dict(kernel=7), ValueError, "unknown kernel"),
        (dict(shape=(2, 4)), ValueError, r"\(N, H, W\)"),
        (dict(mismatch=True), ValueError, "share shape"),
    ],
)
def test_op_checks_arguments_before_the_extension(cpp, change, error, match):
    """The ops raise Python errors without reaching the C++ checks (docs/cuda.md: an exception
    thrown inside the extension crashed one GPU image)."""
    shape = change.get("shape", (1, 4, 4))
    u = torch.rand(*shape, dtype=change.get("dtype", torch.float32))
    other = torch.rand(1, 4, 5) if change.get("mismatch") else u
    win_h, win_w = change.get("win", (3, 3))
    args = (u, u, u, other, win_h, win_w, change.get("valid", False), change.get("bins", 4),
            change.get("bandwidth", 0.5), change.get("kernel", 0), 0, 1e-10, False)
    with pytest.raises(error, match=match):
        cpp.local_divergence_op(*args)
