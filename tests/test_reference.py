"""The reference against docs/spec.md: analytic cases, a brute-force transcription, gradcheck."""
import math

import pytest
import torch

import entropy_kernels as ek
from entropy_kernels import reference
from entropy_kernels.options import RING_INDEX, make_options, neighbor_value

loss = ek.spatial_entropy_loss


def _k(v, kernel):
    if kernel == "logistic":
        e = math.exp(-abs(v))
        return e / (1 + e) ** 2
    return math.exp(-v * v / 2) / math.sqrt(2 * math.pi)


def brute_force_divergence(x_pred, x_tgt, ring, bins, h, kernel, window, padding, divergence, eps):
    """docs/spec.md transcribed with Python loops over pixels, windows and cells, for one (H, W) plane."""
    height, width = x_pred.shape
    offsets = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]

    def maps(x):
        u = [[(bins - 1) * min(max(float(x[r, c]), 0.0), 1.0) for c in range(width)] for r in range(height)]
        m = [[0.0] * width for _ in range(height)]
        for r in range(height):
            for c in range(width):
                num = den = 0.0
                for (dr, dc), w in zip(offsets, ring):
                    if 0 <= r + dr < height and 0 <= c + dc < width:
                        num += w * u[r + dr][c + dc]
                        den += w
                m[r][c] = num / den
        return u, m

    def density(u, m, rows, cols):
        pixels = [(r, c) for r in rows for c in cols]
        return [
            [sum(_k((u[r][c] - i) / h, kernel) * _k((m[r][c] - j) / h, kernel) for r, c in pixels) / (h * h * len(pixels))
             for j in range(bins)]
            for i in range(bins)
        ]

    up, mp = maps(x_pred)
    ut, mt = maps(x_tgt)
    half = window // 2
    centres_r = range(height) if padding == "same" else range(half, height - half)
    centres_c = range(width) if padding == "same" else range(half, width - half)
    out = []
    for r0 in centres_r:
        row = []
        for c0 in centres_c:
            rows = range(max(r0 - half, 0), min(r0 + half + 1, height))
            cols = range(max(c0 - half, 0), min(c0 + half + 1, width))
            p, q = density(ut, mt, rows, cols), density(up, mp, rows, cols)
            if divergence == "kl":
                d = sum((p[i][j] + eps) * math.log((p[i][j] + eps) / (q[i][j] + eps)) + q[i][j] - p[i][j]
                        for i in range(bins) for j in range(bins))
            else:
                s = sum((math.sqrt(p[i][j] + eps) - math.sqrt(q[i][j] + eps)) ** 2 for i in range(bins) for j in range(bins))
                d = math.sqrt(s + eps) / math.sqrt(2)
            row.append(d)
        out.append(row)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("kernel", ["logistic", "gaussian"])
@pytest.mark.parametrize("divergence", ["kl", "hellinger"])
@pytest.mark.parametrize("padding", ["same", "valid"])
def test_matches_brute_force_transcription(kernel, divergence, padding):
    torch.manual_seed(1)
    height, width, bins, window = 5, 6, 5, 3
    x_pred = torch.rand(height, width, dtype=torch.float64) * 1.2 - 0.1  # some values clamp
    x_tgt = torch.rand(height, width, dtype=torch.float64)
    ring = torch.rand(8, dtype=torch.float64)
    ring = ring / ring.sum()
    got = loss(x_pred[None, None], x_tgt[None, None], bins=bins, bandwidth=0.7, kernel=kernel, window=window,
               neighbor_weights=ring, divergence=divergence, padding=padding, reduction="none", eps=1e-6,
               backend="reference")[0, 0]
    want = brute_force_divergence(x_pred, x_tgt, ring.tolist(), bins, 0.7, kernel, window, padding, divergence, 1e-6)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_neighbor_value_skips_outside_and_renormalises():
    u = torch.rand(2, 4, 5, dtype=torch.float64)
    ring = torch.rand(8, dtype=torch.float64)
    m = neighbor_value(u, ring)
    offsets = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]
    r, c = 0, 4  # top-right corner: neighbours (0,3), (1,3), (1,4) only
    inside = [(w, u[:, r + dr, c + dc]) for (dr, dc), w in zip(offsets, ring) if 0 <= r + dr < 4 and 0 <= c + dc < 5]
    want = sum(w * v for w, v in inside) / sum(w for w, _ in inside)
    torch.testing.assert_close(m[:, r, c], want)


@pytest.mark.parametrize("kernel", ["logistic", "gaussian"])
@pytest.mark.parametrize("divergence", ["kl", "hellinger"])
@pytest.mark.parametrize("padding", ["same", "valid"])
def test_identical_inputs_give_zero_and_zero_gradient(kernel, divergence, padding):
    x = torch.rand(2, 3, 9, 11, dtype=torch.float64)
    pred = x.clone().requires_grad_(True)
    value = loss(pred, x, bins=12, kernel=kernel, divergence=divergence, padding=padding, window=5,
                 backend="reference")
    value.backward()
    # Hellinger keeps its eps under the square root: sqrt(eps) / sqrt(2) at P == Q.
    floor = 0.0 if divergence == "kl" else math.sqrt(1e-10) / math.sqrt(2)
    assert abs(value.item() - floor) < 1e-12
    assert pred.grad.abs().max() < 1e-12


def test_constant_image_mass_in_the_cells_the_formula_gives():
    bins, h, level = 9, 0.5, 0.4
    u = torch.full((1, 6, 7), level * (bins - 1), dtype=torch.float64)  # u = 3.2, m = u
    p = reference.local_density(u, u, 3, 3, False, bins, h, "logistic")
    a = torch.tensor([_k((3.2 - i) / h, "logistic") / h for i in range(bins)], dtype=torch.float64)
    expected = torch.outer(a, a)
    for r, c in [(0, 0), (2, 3), (5, 6)]:  # corners and interior alike: renormalised, not padded
        torch.testing.assert_close(p[0, :, :, r, c], expected)
    assert divmod(int(p[0, :, :, 2, 3].argmax()), bins) == (3, 3)


@pytest.mark.parametrize("kernel,tol", [("logistic", 5e-3), ("gaussian", 2e-2)])
def test_densities_sum_to_about_one_inside_the_bin_range(kernel, tol):
    bins = 16
    u = 3 + torch.rand(2, 8, 8, dtype=torch.float64) * (bins - 7)
    m = 3 + torch.rand(2, 8, 8, dtype=torch.float64) * (bins - 7)
    p = reference.local_density(u, m, 5, 5, False, bins, 0.5, kernel)
    mass = p.sum((1, 2))
    assert (mass - 1).abs().max() < tol


def test_same_border_windows_are_renormalised_not_padded():
    torch.manual_seed(3)
    u, m = torch.rand(1, 6, 6, dtype=torch.float64) * 7, torch.rand(1, 6, 6, dtype=torch.float64) * 7
    p = reference.local_density(u, m, 5, 5, False, 8, 0.5, "logistic")
    a = reference.kernel_values(u[0, :3, :3], 8, 0.5, "logistic")  # corner window keeps 3x3 pixels
    b = reference.kernel_values(m[0, :3, :3], 8, 0.5, "logistic")
    want = torch.einsum("rci,rcj->ij", a, b) / 9
    torch.testing.assert_close(p[0, :, :, 0, 0], want)


MODES = ["shuffled", "random", "mean", "randn", "tensor"]


def _weights(mode):
    return torch.tensor([0.3, 1.0, 0.2, 0.7, 0.5, 0.9, 0.1, 0.4], dtype=torch.float64) if mode == "tensor" else mode


@pytest.mark.parametrize("kernel", ["logistic", "gaussian"])
@pytest.mark.parametrize("divergence", ["kl", "hellinger"])
@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("mode", MODES)
def test_gradcheck(kernel, divergence, padding, mode):
    torch.manual_seed(7)
    pred = (0.1 + 0.8 * torch.rand(2, 1, 4, 5, dtype=torch.float64)).requires_grad_(True)
    target = torch.rand(2, 1, 4, 5, dtype=torch.float64)

    def f(p):
        gen = torch.Generator().manual_seed(11)  # the same weights at every evaluation
        return loss(p, target, bins=5, bandwidth=0.8, kernel=kernel, window=3, neighbor_weights=_weights(mode),
                    divergence=divergence, padding=padding, generator=gen, reduction="none", backend="reference")

    assert torch.autograd.gradcheck(f, (pred,), eps=1e-6, atol=1e-6, rtol=1e-4)


def _pair(shape=(2, 3, 10, 9), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=dtype), torch.rand(shape, generator=g, dtype=dtype)


def _fixed(**kw):
    return dict(bins=8, neighbor_weights="mean", backend="reference", **kw)


def test_reductions_agree():
    pred, target = _pair()
    full = loss(pred, target, reduction="none", window=3, **_fixed())
    assert full.shape == (2, 3, 10, 9)
    torch.testing.assert_close(loss(pred, target, reduction="mean", window=3, **_fixed()), full.mean())
    torch.testing.assert_close(loss(pred, target, reduction="sum", window=3, **_fixed()), full.sum())
    valid = loss(pred, target, reduction="none", window=5, padding="valid", **_fixed())
    assert valid.shape == (2, 3, 6, 5)


def test_window_tuple_is_the_equal_weight_mean_of_its_sides():
    pred, target = _pair()
    sides = [loss(pred, target, window=s, **_fixed()) for s in (1, 3, 7)]
    torch.testing.assert_close(loss(pred, target, window=(1, 3, 7), **_fixed()), sum(sides) / 3)
    maps = [loss(pred, target, window=s, reduction="none", **_fixed()) for s in (1, 3)]
    torch.testing.assert_close(loss(pred, target, window=(1, 3), reduction="none", **_fixed()), (maps[0] + maps[1]) / 2)


def test_global_window_is_one_valid_window_over_the_image():
    pred, target = _pair((2, 3, 7, 7))
    torch.testing.assert_close(loss(pred, target, window="global", **_fixed()),
                               loss(pred, target, window=7, padding="valid", **_fixed()))
    assert loss(pred, target, window="global", reduction="none", **_fixed()).shape == (2, 3, 1, 1)


def test_generator_makes_random_weights_reproducible():
    pred, target = _pair()
    for mode in ("shuffled", "random", "randn"):
        runs = [loss(pred, target, bins=8, neighbor_weights=mode, generator=torch.Generator().manual_seed(s),
                     backend="reference") for s in (5, 5, 6)]
        assert runs[0].item() == runs[1].item()
        assert runs[0].item() != runs[2].item()


def test_three_dim_input_is_one_image():
    pred, target = _pair((3, 8, 9))
    torch.testing.assert_close(loss(pred, target, **_fixed()), loss(pred[None], target[None], **_fixed()))
    assert loss(pred, target, reduction="none", **_fixed()).shape == (3, 8, 9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(dtype):
    pred, target = _pair(dtype=dtype)
    pred.requires_grad_(True)
    value = loss(pred, target, **_fixed())
    want = loss(pred.detach().float(), target.float(), **_fixed())
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, want)
    value.backward()
    assert pred.grad.dtype == dtype and torch.isfinite(pred.grad.float()).all()


def test_non_contiguous_and_channels_last():
    pred, target = _pair((2, 3, 10, 12))
    want = loss(pred, target, **_fixed())
    torch.testing.assert_close(loss(pred.contiguous(memory_format=torch.channels_last),
                                    target.contiguous(memory_format=torch.channels_last), **_fixed()), want)
    wide_p, wide_t = _pair((2, 3, 10, 24))
    got = loss(wide_p[..., ::2], wide_t[..., ::2], **_fixed())
    torch.testing.assert_close(got, loss(wide_p[..., ::2].contiguous(), wide_t[..., ::2].contiguous(), **_fixed()))


def test_grad_output_other_than_one():
    pred, target = _pair()
    pred.requires_grad_(True)
    weights = torch.rand(2, 3, 10, 9, dtype=torch.float64) * 4 - 1

    def weighted(p):
        return (loss(p, target, reduction="none", **_fixed()) * weights).sum()

    weighted(pred).backward()
    direction = torch.randn_like(pred)
    with torch.no_grad():
        slope = (weighted(pred + 1e-6 * direction) - weighted(pred - 1e-6 * direction)) / 2e-6
    torch.testing.assert_close((pred.grad * direction).sum(), slope, rtol=1e-6, atol=1e-9)


def test_only_pred_gets_a_gradient():
    pred, target = _pair()
    pred.requires_grad_(True)
    target.requires_grad_(True)
    loss(pred, target, **_fixed()).backward()
    assert pred.grad is not None and target.grad is None


@pytest.mark.parametrize("clamp", [True, False])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["pred", "target"])
def test_non_finite_input_gives_nan(clamp, bad, where):
    pred, target = _pair()
    (pred if where == "pred" else target)[1, 2, 4, 4] = bad
    assert torch.isnan(loss(pred, target, clamp=clamp, **_fixed()))


def test_module_matches_function_and_validates_early():
    pred, target = _pair()
    module = ek.SpatialEntropyLoss(**_fixed(window=(1, 3)))
    torch.testing.assert_close(module(pred, target), loss(pred, target, **_fixed(window=(1, 3))))
    with pytest.raises(ValueError, match="bins"):
        ek.SpatialEntropyLoss(bins=1)


def test_available_backends_reports_reference_and_reasons():
    table = ek.available_backends()
    assert set(table) == {"cpu", "cuda"}
    assert table["cpu"]["reference"].available and table["cpu"]["reference"].reason is None
    assert str(table["cpu"]["reference"]) == "available"
    for row in table.values():
        for status in row.values():
            assert status.available == (status.reason is None) == bool(status)
            assert status.available or (status.reason and str(status) == f"unavailable: {status.reason}")


def test_options_renormalise_weight_tensors():
    grid = torch.arange(9, dtype=torch.float64).view(3, 3) + 1
    opts = make_options(neighbor_weights=grid)
    torch.testing.assert_close(opts.neighbor_weights, grid.reshape(-1)[list(RING_INDEX)] / 40)
