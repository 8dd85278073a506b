"""Metric-weight conversion and the metrics that use it, on small synthetic inputs (no downloads)."""
import io
import math
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train.metrics import (LPIPS, NIQE_FILE, NumpyOnlyUnpickler, _matlab_half, lpips_state_from_flax, niqe,
                           optional_metrics)

SHAPES = ((11, 3, 64), (5, 64, 192), (3, 192, 384), (3, 384, 256), (3, 256, 256))


def flax_params(rng):
    params = {"AlexNet_0": {}}
    for k, (size, cin, cout) in enumerate(SHAPES):
        params["AlexNet_0"][f"Conv_{k}"] = {
            "kernel": rng.normal(0, 0.05, (size, size, cin, cout)).astype(np.float32),
            "bias": rng.normal(0, 0.05, cout).astype(np.float32),
        }
        params[f"NetLinLayer_{k}"] = {"Conv_0": {"kernel": rng.uniform(0, 0.1, (1, 1, cout, 1)).astype(np.float32)}}
    return params


def test_unpickler_reads_numpy_arrays_in_dicts():
    data = {"a": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, "b": np.array([1.5])}
    loaded = NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(data, protocol=4))).load()
    np.testing.assert_array_equal(loaded["a"]["w"], data["a"]["w"])
    assert loaded["a"]["w"].dtype == np.float32


@pytest.mark.parametrize("payload", [{"x": os.system}, {"x": pickle.Unpickler}, torch.ones(2)])
def test_unpickler_refuses_everything_else(payload):
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(payload, protocol=4))).load()


def test_flax_conversion_matches_a_direct_correlation():
    rng = np.random.default_rng(0)
    params = NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(flax_params(rng), protocol=4))).load()
    net = LPIPS()
    net.load_state_dict(lpips_state_from_flax(params))
    x = torch.from_numpy(rng.uniform(-1, 1, (1, 3, 23, 27)).astype(np.float32))
    with torch.no_grad():
        out = F.conv2d(x, net.convs[0].weight, net.convs[0].bias, stride=4, padding=2)
    kernel, bias = params["AlexNet_0"]["Conv_0"]["kernel"], params["AlexNet_0"]["Conv_0"]["bias"]
    padded = np.pad(x[0].numpy(), ((0, 0), (2, 2), (2, 2)))
    y, xx, o = 2, 3, 17  # one output value, by the flax (HWIO, cross-correlation) definition
    patch = padded[:, 4 * y : 4 * y + 11, 4 * xx : 4 * xx + 11]  # (I, H, W)
    expected = np.einsum("ihw,hwi->", patch, kernel[..., o]) + bias[o]
    assert float(out[0, o, y, xx]) == pytest.approx(float(expected), rel=1e-4, abs=1e-5)
    head = params["NetLinLayer_2"]["Conv_0"]["kernel"][0, 0, :, 0]
    np.testing.assert_array_equal(net.heads[2].weight.detach().numpy().ravel(), head)


def test_lpips_is_zero_for_identical_images_and_grows_with_noise():
    rng = np.random.default_rng(1)
    net = LPIPS()
    net.load_state_dict(lpips_state_from_flax(flax_params(rng)))
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 64, 64, generator=gen)
    with torch.no_grad():
        assert torch.allclose(net(a, a), torch.zeros(2))
        small = net(a, (a + 0.02 * torch.randn(a.shape, generator=gen)).clamp(0, 1))
        large = net(a, (a + 0.3 * torch.randn(a.shape, generator=gen)).clamp(0, 1))
    assert (small > 0).all() and (large > small).all()


def test_matlab_half_resize_keeps_constants_and_samples_ramps_at_the_pixel_centres():
    np.testing.assert_allclose(_matlab_half(np.full((20, 30), 0.4)), np.full((10, 15), 0.4))
    ramp = np.tile(np.arange(40.0), (9, 1))
    half = _matlab_half(ramp)
    assert half.shape == (5, 20)
    np.testing.assert_allclose(half[:, 3:-3], np.tile(2 * np.arange(3, 17) + 0.5, (5, 1)), atol=1e-9)


def test_niqe_runs_on_two_blocks_and_refuses_small_images():
    rng = np.random.default_rng(2)
    window = np.exp(-((np.arange(7) - 3) ** 2) / (2 * 7 / 6) ** 2)
    window = np.outer(window, window) / np.outer(window, window).sum()
    params = {"mu_pris_param": torch.zeros(1, 36, dtype=torch.float64), "cov_pris_param": torch.eye(36, dtype=torch.float64),
              "gaussian_window": torch.from_numpy(window)}
    image = torch.from_numpy(rng.uniform(0, 1, (3, 100, 200)))
    score = niqe(image, params)
    assert math.isfinite(score) and score > 0
    assert math.isnan(niqe(image[:, :90], params))


def test_optional_metrics_say_how_to_get_missing_weights(tmp_path):
    images = [(torch.rand(3, 8, 8),) * 3]
    extra = optional_metrics(images, "cpu", cache=tmp_path)
    assert "fetch-metric-weights" in extra["lpips"] and "fetch-metric-weights" in extra["niqe"]
    assert not (tmp_path / NIQE_FILE).exists()


def test_optional_metrics_refuse_images_too_small_for_their_networks(tmp_path):
    from train.checkpoint import save_checkpoint
    from train.metrics import LPIPS_FILE

    save_checkpoint(tmp_path / LPIPS_FILE, LPIPS().state_dict())
    small = [(torch.rand(3, 20, 24),) * 3]
    assert "at least 32 px, got 20" in optional_metrics(small, "cpu", cache=tmp_path)["lpips"]
    large = [(torch.rand(3, 40, 36), torch.rand(3, 40, 36), torch.rand(3, 40, 36))]
    value = optional_metrics(large, "cpu", cache=tmp_path)["lpips"]
    assert isinstance(value, float) and math.isfinite(value)


def test_lpips_calibration_reads_the_wheel_and_refuses_weights_that_miss_the_official_values(tmp_path, monkeypatch):
    """The calibration path of fetch-metric-weights without a download: a stand-in pyiqa wheel holds
    random BMP pairs; 'official' values computed with one network pass it and fail another."""
    import zipfile

    from PIL import Image

    from train import metrics

    rng = np.random.default_rng(3)
    images = {}
    with zipfile.ZipFile(tmp_path / "pyiqa-0.1.16-py3-none-any.whl", "w") as wheel:
        for name in metrics.LPIPS_CALIBRATION:
            for side in ("dist", "ref"):
                array = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
                images[name, side] = torch.from_numpy(array).permute(2, 0, 1).float() / 255
                data = io.BytesIO()
                Image.fromarray(array).save(data, format="BMP")
                wheel.writestr(metrics.LPIPS_CALIBRATION_SOURCE[1].format(side=side, name=name), data.getvalue())
    monkeypatch.setattr(metrics.subprocess, "run", lambda *args, **kwargs: None)  # the wheel is already there
    pairs = metrics.lpips_calibration_pairs(tmp_path)
    for name, (distorted, reference) in pairs.items():
        assert torch.equal(distorted, images[name, "dist"]) and torch.equal(reference, images[name, "ref"])

    good, other = LPIPS().eval(), LPIPS().eval()
    good.load_state_dict(lpips_state_from_flax(flax_params(np.random.default_rng(4))))
    other.load_state_dict(lpips_state_from_flax(flax_params(np.random.default_rng(5))))
    with torch.no_grad():
        official = {name: round(float(good(d[None], r[None])[0]), 4) for name, (d, r) in pairs.items()}
    monkeypatch.setattr(metrics, "LPIPS_CALIBRATION", official)
    results = metrics.check_lpips_calibration(good, pairs)
    assert {name: value[1] for name, value in results.items()} == official
    with pytest.raises(RuntimeError, match="do not reproduce the official calibration values"):
        metrics.check_lpips_calibration(other, pairs)
