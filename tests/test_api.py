"""The loss as users call it: signature, value range, determinism, backend status, first-call compile."""
import copy
import inspect
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import entropy_kernels as ek
from entropy_kernels import options
from entropy_kernels.options import make_options, neighbor_value

ROOT = Path(__file__).resolve().parents[1]
loss = ek.spatial_entropy_loss
CPP_REASONS = ek.available_backends()["cpu"]["cpp"].reason
needs_cpp = pytest.mark.skipif(CPP_REASONS is not None, reason=f"cpp backend unavailable: {CPP_REASONS}")


def _pair(shape=(2, 3, 9, 11), dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pred = torch.rand(shape, generator=gen, dtype=dtype)
    return pred, (pred + 0.2 * torch.randn(shape, generator=gen, dtype=dtype)).clamp(0, 1)


def test_function_and_module_share_the_signature_of_make_options():
    function = inspect.signature(loss).parameters
    module = inspect.signature(ek.SpatialEntropyLoss).parameters
    definition = inspect.signature(make_options).parameters
    assert list(function)[:2] == ["pred", "target"]
    assert [function[name] for name in list(function)[2:]] == list(definition.values())
    assert [module[name] for name in list(module)[:-1]] == list(definition.values())
    assert list(module)[-1] == "seed" and module["seed"].default is None
    assert definition["data_range"].default == (0.0, 1.0) and definition["bins"].default == 32


def test_module_repr_shows_the_given_keywords_and_validates_at_construction():
    assert repr(ek.SpatialEntropyLoss(bins=16, data_range=255)) == "SpatialEntropyLoss(bins=16, data_range=255)"
    with pytest.raises(ValueError, match="data_range"):
        ek.SpatialEntropyLoss(data_range=(1, 0))


BACKENDS = ["reference", pytest.param("cpp", marks=needs_cpp)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("low,high", [(0.0, 255.0), (-1.0, 1.0), (-3.5, 7.25)])
def test_data_range_is_the_unit_range_rescaled(backend, low, high):
    """Loss on low + (high - low) x with data_range=(low, high) equals the loss on x in [0, 1] and its
    gradient is that one divided by (high - low); some values clamp, a non-uniform grad_output."""
    pred01, target01 = _pair()
    pred01 = pred01 * 1.2 - 0.1
    kw = dict(bins=10, window=(1, 3), neighbor_weights="mean", reduction="none", backend=backend)
    scaled = (low + (high - low) * pred01).requires_grad_()
    unit = pred01.clone().requires_grad_()
    got = loss(scaled, low + (high - low) * target01, data_range=(low, high) if low else high, **kw)
    want = loss(unit, target01, **kw)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    grad_output = torch.rand_like(want) + 0.5
    (g_scaled,) = torch.autograd.grad(got, scaled, grad_output)
    (g_unit,) = torch.autograd.grad(want, unit, grad_output)
    assert (g_unit == 0).any() and (g_unit != 0).any()  # clamped pixels have no gradient
    torch.testing.assert_close(g_scaled, g_unit / (high - low), rtol=1e-8, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_with_a_data_range(backend):
    pred, target = _pair((1, 2, 6, 7))
    pred = (-1 + 2 * (0.05 + 0.9 * pred)).requires_grad_()  # inside (-1, 1), away from the clamp's kinks
    kw = dict(bins=6, window=3, data_range=(-1, 1), neighbor_weights="mean", backend=backend)
    assert torch.autograd.gradcheck(lambda p: loss(p, 2 * target - 1, **kw), (pred,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_range_is_bit_for_bit_the_former_unit_range(backend):
    """The former step 1, u = (L - 1) * clamp(x, 0, 1), through the backend directly, against the
    loss with data_range omitted and with (0, 1) written out."""
    pred, target = _pair(dtype=torch.float32)
    pred = pred * 1.4 - 0.2
    bins, window = 12, 5
    ring = torch.rand(8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    kw = dict(bins=bins, window=window, neighbor_weights=ring, reduction="none", backend=backend)

    def former_maps(x):
        u = (x.double().clamp(0, 1) * (bins - 1)).float().reshape(-1, *x.shape[-2:])
        return u, neighbor_value(u, (ring / ring.sum()).float())

    impl = ek.backends.select(backend, pred.device, torch.float32, bins)
    former = impl.local_divergence(*former_maps(pred), *former_maps(target), window, window, False, bins, 0.5,
                                   "logistic", "kl", 1e-10).reshape(pred.shape)
    assert torch.equal(loss(pred, target, **kw), former)
    assert torch.equal(loss(pred, target, data_range=(0, 1), **kw), former)


def test_clamping_most_of_pred_warns_once_naming_data_range(monkeypatch):
    monkeypatch.setattr(options, "_clamp_warned", False)
    pred, target = _pair(dtype=torch.float32)
    tanh_output = (2 * pred - 1).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss(tanh_output.detach(), target, bins=8)  # no gradient asked: nothing to lose
        loss(tanh_output, 2 * target - 1, bins=8, data_range=(-1, 1))
        loss(tanh_output, target, bins=8, clamp=False)
    with pytest.warns(UserWarning, match=r"outside data_range=\(0.0, 1.0\).*here data_range=\(-1, 1\)"):
        loss(tanh_output, target, bins=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss(tanh_output, target, bins=8)  # once per process
    monkeypatch.setattr(options, "_clamp_warned", False)
    with pytest.warns(UserWarning, match=r"here data_range=\(0, 255\)"):
        ek.SpatialEntropyLoss(bins=8)((255 * pred).requires_grad_(), target)


def test_few_clamped_pixels_do_not_warn(monkeypatch):
    monkeypatch.setattr(options, "_clamp_warned", False)
    pred, target = _pair(dtype=torch.float32)
    pred[:, :, :2] += 1.0  # 2 of 9 rows (22%) above the range
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss(pred.requires_grad_(), target, bins=8)


def test_default_weights_are_random_and_generator_or_mean_make_values_reproducible():
    pred, target = _pair(dtype=torch.float32)
    kw = dict(bins=16, window=5)
    assert loss(pred, target, **kw) != loss(pred, target, **kw)
    seeded = [loss(pred, target, generator=torch.Generator().manual_seed(7), **kw) for _ in range(2)]
    assert torch.equal(*seeded)
    assert torch.equal(loss(pred, target, neighbor_weights="mean", **kw),
                       loss(pred, target, neighbor_weights="mean", **kw))


def test_module_seed_owns_a_generator_that_deepcopy_continues():
    pred, target = _pair(dtype=torch.float32)
    first, second = ek.SpatialEntropyLoss(bins=16, seed=5), ek.SpatialEntropyLoss(bins=16, seed=5)
    values = [first(pred, target) for _ in range(2)]
    assert values[0] != values[1]  # one draw per call, not one per module
    assert torch.equal(second(pred, target), values[0])
    clone = copy.deepcopy(second)
    assert torch.equal(clone(pred, target), values[1]) and torch.equal(second(pred, target), values[1])
    assert clone.generator is not second.generator
    assert second.state_dict() == {}
    second.load_state_dict(first.state_dict())
    with pytest.raises(ValueError, match="seed or generator"):
        ek.SpatialEntropyLoss(seed=1, generator=torch.Generator())
    with pytest.raises(TypeError, match="seed.*'1'"):
        ek.SpatialEntropyLoss(seed="1")


def test_available_backends_prints_what_it_means():
    table = ek.available_backends()
    assert str(table["cpu"]["reference"]) == "available" and bool(table["cpu"]["reference"])
    assert "'reference': available" in str(table)
    if not torch.cuda.is_available():
        assert str(table["cuda"]["cuda"]) == "unavailable: no CUDA device on this machine"
        assert not table["cuda"]["cuda"]
    unavailable = ek.backends.BackendStatus(False, "why")
    assert repr(unavailable) == "unavailable: why" and unavailable.reason == "why"


def test_backend_for_names_the_backend_a_call_runs_on(monkeypatch):
    """What the trainer's start-up line reports: auto's choice as the loss makes it, an explicit
    backend as given, and an explicit backend that cannot serve as the loss's own error."""
    auto = ek.SpatialEntropyLoss().backend_for("cpu")
    cpp_usable = bool(ek.available_backends()["cpu"]["cpp"])
    assert auto == ("cpp" if cpp_usable else "reference")
    assert ek.SpatialEntropyLoss(backend="reference").backend_for("cpu", torch.float16) == "reference"
    monkeypatch.setattr(ek.backends, "_warned", set())  # auto warns once per process and fallback
    with pytest.warns(UserWarning, match="uses 'reference'"):  # eps below the fused backends' floor
        assert ek.SpatialEntropyLoss(eps=0.0).backend_for("cpu") == "reference"
    with pytest.raises(ValueError, match="backend='cuda' cannot serve cpu"):
        ek.SpatialEntropyLoss(backend="cuda").backend_for("cpu")


COMPILE_FIRST_CALL = """
import torch, entropy_kernels as ek
class Objective(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.entropy = ek.SpatialEntropyLoss(bins=8, window=3, data_range=(-1, 1), backend={backend!r})
    def forward(self, pred, target):
        return torch.nn.functional.l1_loss(pred, target) + 0.1 * self.entropy(pred, target)
pred = (2 * torch.rand(1, 2, 8, 9, dtype=torch.float64) - 1).requires_grad_()
target = 2 * torch.rand(1, 2, 8, 9, dtype=torch.float64) - 1
torch.manual_seed(0)
compiled = torch.compile(Objective(), fullgraph=True)(pred, target)
(g_compiled,) = torch.autograd.grad(compiled, pred)
torch.manual_seed(0)
eager = Objective()(pred, target)
(g_eager,) = torch.autograd.grad(eager, pred)
torch.testing.assert_close(compiled, eager)
torch.testing.assert_close(g_compiled, g_eager)
print("compiled first call ok")
"""


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_cpp), "triton"])
def test_compile_fullgraph_works_on_the_first_call_of_a_fresh_process(backend):
    """The first call resolves the backend (imports, extension load) at trace time and keeps the choice
    as a constant; the default random weights are drawn inside the graph from torch's generator, so
    with the same seed the compiled and the eager loss and gradient agree."""
    if backend == "triton":
        pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1") if backend == "triton" else {
        k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", COMPILE_FIRST_CALL.format(backend=backend)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "compiled first call ok" in result.stdout


def test_loss_in_your_loop_example_runs():
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "loss_in_your_loop.py"), "--tiny"], cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "l1" in result.stdout and "entropy" in result.stdout
