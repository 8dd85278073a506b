"""Every bad input named in docs/spec.md raises the error it names, with the argument and value."""
import pytest
import torch

import entropy_kernels as ek

loss = ek.spatial_entropy_loss
X = torch.rand(1, 3, 8, 8)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(bins=1), ValueError, "bins.*1"),
        (dict(bins=2.5), TypeError, "bins"),
        (dict(bins=True), TypeError, "bins"),
        (dict(bandwidth=0), ValueError, "bandwidth.*0"),
        (dict(bandwidth=-1.0), ValueError, "bandwidth"),
        (dict(bandwidth=float("nan")), ValueError, "bandwidth"),
        (dict(bandwidth="wide"), TypeError, "bandwidth"),
        (dict(kernel="box"), ValueError, "kernel.*box"),
        (dict(window=4), ValueError, "window.*4"),
        (dict(window=(3, 6)), ValueError, "6"),
        (dict(window=0), ValueError, "window"),
        (dict(window=()), TypeError, "window"),
        (dict(window="local"), ValueError, "window.*local"),
        (dict(window=3.0), TypeError, "window"),
        (dict(neighbor_weights="gauss"), ValueError, "neighbor_weights.*gauss"),
        (dict(neighbor_weights=torch.ones(7)), ValueError, "neighbor_weights.*7"),
        (dict(neighbor_weights=torch.zeros(8)), ValueError, "zero"),
        (dict(neighbor_weights=[0.125] * 8), TypeError, "neighbor_weights"),
        (dict(divergence="js"), ValueError, "divergence.*js"),
        (dict(padding="reflect"), ValueError, "padding.*reflect"),
        (dict(clamp="yes"), TypeError, "clamp"),
        (dict(eps=-1e-3), ValueError, "eps"),
        (dict(reduction="max"), ValueError, "reduction.*max"),
        (dict(generator=0), TypeError, "generator"),
        (dict(backend="opencl"), ValueError, "backend.*opencl"),
        (dict(padding="valid", window=(3, 5), reduction="none"), ValueError, "none.*valid"),
        (dict(padding="valid", window=9), ValueError, "window=9.*8x8"),
        (dict(bins=10000), ValueError, "bins.*1024.*10000"),
        (dict(bandwidth=1e-320), ValueError, "bandwidth.*0.001.*1e-320"),
        (dict(bandwidth=5e-4), ValueError, "bandwidth"),
        (dict(neighbor_weights=torch.full((8,), 1e308, dtype=torch.float64)), ValueError, "neighbor_weights.*sum.*inf"),
        (dict(neighbor_weights=torch.ones(8, dtype=torch.complex64)), TypeError, "neighbor_weights.*complex"),
        (dict(neighbor_weights=torch.ones(8, device="meta")), ValueError, "neighbor_weights.*meta"),
        (dict(data_range=0), ValueError, "data_range"),
        (dict(data_range=(1, -1)), ValueError, r"data_range.*\(1, -1\)"),
        (dict(data_range=(0, float("inf"))), ValueError, "data_range"),
        (dict(data_range=(-1e308, 1e308)), ValueError, "data_range"),
        (dict(data_range=(0, 1, 2)), TypeError, "data_range"),
        (dict(data_range="0-255"), TypeError, "data_range.*0-255"),
    ],
)
def test_bad_parameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        loss(X, X, **kwargs)


@pytest.mark.parametrize(
    "pred,target,error,match",
    [
        (X, torch.rand(1, 3, 8, 9), ValueError, r"same shape.*\(1, 3, 8, 9\)"),
        (torch.rand(8, 8), torch.rand(8, 8), ValueError, r"pred.*\(8, 8\)"),
        (torch.rand(1, 1, 1, 8, 8), torch.rand(1, 1, 1, 8, 8), ValueError, "pred"),
        (torch.rand(0, 3, 8, 8), torch.rand(0, 3, 8, 8), ValueError, "empty"),
        (torch.randint(0, 255, (1, 3, 8, 8)), X, TypeError, "pred.*int64"),
        (X, torch.randint(0, 255, (1, 3, 8, 8), dtype=torch.uint8), TypeError, "target.*uint8"),
        (X.numpy(), X, TypeError, "pred.*ndarray"),
        (X, X.to("meta"), ValueError, "device.*meta"),
    ],
)
def test_bad_inputs(pred, target, error, match):
    with pytest.raises(error, match=match):
        loss(pred, target)


def test_large_bins_refused_before_allocating():
    """The cap holds at construction, before any input exists (bins=10000 used to grow to 6 GiB)."""
    with pytest.raises(ValueError, match="bins must be in \\[2, 1024\\]"):
        ek.SpatialEntropyLoss(bins=10000)
    assert torch.isfinite(loss(X, X.flip(-1), bins=1024, window=1, backend="cpp", neighbor_weights="mean"))


@pytest.mark.parametrize("call", [lambda: loss(X, X, binz=8), lambda: ek.SpatialEntropyLoss(binz=8)])
def test_unknown_keyword_names_the_public_api_and_lists_valid_ones(call):
    with pytest.raises(TypeError) as info:
        call()
    message = str(info.value)
    assert message.startswith(("spatial_entropy_loss() got an unexpected keyword argument 'binz'",
                               "SpatialEntropyLoss() got an unexpected keyword argument 'binz'"))
    assert "did you mean 'bins'?" in message and "valid keywords: bins, bandwidth," in message
    assert "make_options" not in message


def test_unavailable_backend_says_why():
    with pytest.raises(ValueError, match="backend='cuda'"):
        loss(X, X, backend="cuda")


def test_auto_on_cuda_prefers_the_cuda_extension_then_triton(monkeypatch):
    """The order measured on an H100 (docs/results.md): cuda, then triton, then the reference; a
    skipped backend is named with its reason. Simulated: no GPU is needed to test the choice."""
    from entropy_kernels import backends

    unavailable = set()
    monkeypatch.setattr(backends, "not_supported_reasons",
                        lambda name, device, dtype, bins, eps=None: ["not built here"] if name in unavailable else [])
    monkeypatch.setattr(backends, "_warned", set())
    cuda = torch.device("cuda")
    assert backends.select("auto", cuda, torch.float32, 32) is backends._load("cuda")[0]
    unavailable.add("cuda")
    with pytest.warns(UserWarning, match=r"uses 'triton'.*cuda unavailable \(not built here\)"):
        chosen = backends.select("auto", cuda, torch.float32, 32)
    assert chosen is backends._load("triton")[0]
    unavailable.add("triton")
    with pytest.warns(UserWarning, match="uses 'reference'"):
        assert backends.select("auto", cuda, torch.float32, 32) is backends._load("reference")[0]
