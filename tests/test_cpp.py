"""What is specific to backend='cpp' (and to the extension's ops, which 'cuda' shares where a GPU is
present): the CPU layouts of its scratch, its ops' own paths, threads, argument checks and eps floor.
tests/test_contract.py holds the contract every backend meets.

The extension is built (or imported) once per test session by the first test that needs it.
"""
from __future__ import annotations

import pytest
import torch

import entropy_kernels
from entropy_kernels import reference, testing
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
    n, height, width, bins, win_h, win_w, valid, kernel, divergence = case
    args = (win_h, win_w, valid, bins, 0.5, kernel, divergence, 1e-10)
    maps = random_maps(n, height, width, bins)
    # a random grad_output, and the forward's own gradient (grad_output uniform), which the backward rescales
    for grad_out in (None, 0.75):
        d_ref, gu_ref, gm_ref, g = values_and_grads(reference, maps, args, grad_out)
        d, gu, gm, _ = values_and_grads(cpp, maps, args, g)
        for name, got, expected in (("D", d, d_ref), ("grad_u", gu, gu_ref), ("grad_m", gm, gm_ref)):
            testing.assert_float64_parity(got, expected, "cpp", name)


def test_auto_picks_cpp_for_cpu(cpp):
    assert entropy_kernels.available_backends()["cpu"]["cpp"].available
    pred, target = torch.rand(1, 1, 6, 6), torch.rand(1, 1, 6, 6)
    kw = dict(bins=8, window=3, neighbor_weights="mean")
    auto = entropy_kernels.spatial_entropy_loss(pred, target, backend="auto", **kw)
    assert torch.equal(auto, entropy_kernels.spatial_entropy_loss(pred, target, backend="cpp", **kw))


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


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_image_gives_nan_loss(cpp, bad):
    pred, target = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    target[1, 2, 3, 3] = bad
    loss = entropy_kernels.spatial_entropy_loss(pred, target, bins=8, window=3, backend="cpp")
    assert torch.isnan(loss)
    per_window = entropy_kernels.spatial_entropy_loss(pred, target, bins=8, window=3, backend="cpp", reduction="none")
    assert torch.isfinite(per_window[0]).all() and torch.isnan(per_window[1, 2]).any()


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
    impl, name = impl_for(device), "cpp" if device == "cpu" else "cuda"
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
    testing.assert_float64_parity(gu[ok], gu_full[ok], name)
    testing.assert_float64_parity(gm[ok], gm_full[ok], name)
    testing.assert_float64_parity(gu[ok], gu_ref[ok], name)
    testing.assert_float64_parity(gm[ok], gm_ref[ok], name)
    testing.assert_float64_parity(d[~torch.isnan(d)], d_ref[~torch.isnan(d)], name)


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
