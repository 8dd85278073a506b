"""Paired low/normal-light images: LOL-v1, LOL-v2-real, any two folders, and the built-in demo set.

Every layout becomes a list of (low path, high path) pairs; :class:`RandomCrops` turns pairs
into training crops whose position, flip and rotation depend only on (seed, epoch, index), so a
resumed run sees exactly the crops an uninterrupted one would.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
# The split folders of each layout (docs/data.md); 'folders' names its own.
LAYOUTS = {
    "lol_v1": {"train": ("our485/low", "our485/high"), "test": ("eval15/low", "eval15/high")},
    "lol_v2_real": {"train": ("Train/Low", "Train/Normal"), "test": ("Test/Low", "Test/Normal")},
    "demo": {"train": ("train/low", "train/high"), "test": ("test/low", "test/high")},
}
# LOL-v2 names a pair low00001.png / normal00001.png: the prefix is not part of the key.
_PREFIX = re.compile(r"^(low|normal|high)[_-]?", re.IGNORECASE)


class DataError(ValueError):
    """A data problem the user can fix; the message names the file or folder."""


def cache_dir(*parts: str) -> Path:
    """Where generated data and converted weights live: outside the repository, never committed."""
    root = os.environ.get("ENTROPY_KERNELS_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    ) / "entropy_kernels"
    return Path(root).joinpath(*parts)


def read_image(path) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1]; greyscale is repeated, alpha dropped."""
    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"))
    except Exception as exc:  # noqa: BLE001 - PIL raises many types; the user needs the file name
        raise DataError(f"cannot read image {path}: {exc}") from exc
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255


def write_image(path, image: torch.Tensor) -> None:
    """Saves a (3, H, W) image in [0, 1] as an 8-bit PNG (atomically, so a crash leaves no half file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = (image.detach().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy())
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


def image_size(path):
    """(height, width) read from the header only."""
    try:
        with Image.open(path) as img:
            return img.height, img.width
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"cannot read image {path}: {exc}") from exc


def list_images(folder) -> list:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"no images in folder {folder}")
    return files


def pair_folders(low_dir, high_dir, match: str = "name") -> list:
    """(low, high) path pairs matched by file name (prefix low/normal/high ignored) or by sorted order."""
    lows, highs = list_images(low_dir), list_images(high_dir)
    if match == "order":
        if len(lows) != len(highs):
            raise DataError(f"{low_dir} has {len(lows)} images but {high_dir} has {len(highs)}")
        return list(zip(lows, highs))
    if match != "name":
        raise ValueError(f"match must be 'name' or 'order', got {match!r}")
    by_key = {_PREFIX.sub("", p.stem): p for p in highs}
    pairs = []
    for low in lows:
        high = by_key.get(_PREFIX.sub("", low.stem))
        if high is None:
            raise DataError(f"low-light image {low} has no normal-light pair in {high_dir}")
        pairs.append((low, high))
    return pairs


def split_pairs(data_cfg: dict, split: str) -> list:
    """The (low, high) pairs of 'train' or 'test' for a data section of a config."""
    layout = data_cfg["layout"]
    if layout == "folders":
        folders = data_cfg[split]
        return pair_folders(folders["low"], folders["high"], data_cfg.get("match", "name"))
    if layout not in LAYOUTS:
        raise ValueError(f"data.layout must be one of {sorted(LAYOUTS) + ['folders']}, got {layout!r}")
    root = Path(make_demo_dataset() if layout == "demo" else data_cfg["root"])
    low, high = LAYOUTS[layout][split]
    return pair_folders(root / low, root / high, data_cfg.get("match", "name"))


def check_crop(pairs, crop: int) -> None:
    for low, high in pairs:
        low_size, high_size = image_size(low), image_size(high)
        if low_size != high_size:
            raise DataError(f"{low} is {low_size[0]}x{low_size[1]} but its pair {high} is {high_size[0]}x{high_size[1]}")
        if min(low_size) < crop:
            raise DataError(f"crop {crop} is larger than image {low} ({low_size[0]}x{low_size[1]})")


class RandomCrops(Dataset):
    """Random aligned crops of the pairs with random flips and 90-degree rotations.

    ``length`` items make an epoch (item i uses pair i mod len(pairs)); an item's crop depends
    only on (seed, epoch, i)."""

    def __init__(self, pairs, crop: int, length: int, seed: int = 0):
        check_crop(pairs, crop)
        self.pairs, self.crop, self.length, self.seed, self.epoch = list(pairs), crop, length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        low_path, high_path = self.pairs[index % len(self.pairs)]
        low, high = read_image(low_path), read_image(high_path)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        top = int(rng.integers(0, low.shape[1] - self.crop + 1))
        left = int(rng.integers(0, low.shape[2] - self.crop + 1))
        both = torch.stack([low, high])[..., top : top + self.crop, left : left + self.crop]
        if rng.random() < 0.5:
            both = both.flip(-1)
        both = torch.rot90(both, int(rng.integers(0, 4)), dims=(-2, -1))
        return both[0].contiguous(), both[1].contiguous()


# ---- the built-in demo set: low-light pairs synthesised from scikit-image's photographs (docs/data.md) ----

DEMO_VERSION = "1"
DEMO_TRAIN = ("astronaut", "rocket", "motorcycle_left", "motorcycle_right", "hubble_deep_field",
              "immunohistochemistry", "retina", "colorwheel")
DEMO_TEST = ("chelsea", "coffee")


def _photo(name: str) -> np.ndarray:
    import skimage.data

    if name.startswith("motorcycle_"):
        left, right, _ = skimage.data.stereo_motorcycle()
        return left if name.endswith("left") else right
    return getattr(skimage.data, name)()[..., :3]


def _srgb_to_linear(x):
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def _linear_to_srgb(x):
    x = np.clip(x, 0, 1)
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * x ** (1 / 2.4) - 0.055)


def synthesise_low_light(photo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A low-light uint8 image from an sRGB uint8 photo: exposure x 0.05..0.3, an optional colour
    cast, Poisson shot noise and Gaussian read noise in linear light, quantised to 8 bits."""
    linear = _srgb_to_linear(photo.astype(np.float64) / 255)
    gain = rng.uniform(0.05, 0.3) * (rng.uniform(0.85, 1.15, size=3) if rng.random() < 0.5 else np.ones(3))
    photons_at_white = rng.uniform(300, 1500)
    signal = rng.poisson(linear * gain * photons_at_white) / photons_at_white
    signal = signal + rng.normal(0, rng.uniform(0.0005, 0.003), size=signal.shape)
    return np.round(_linear_to_srgb(signal) * 255).astype(np.uint8)


def _resize(photo: np.ndarray, longest: int) -> np.ndarray:
    img = Image.fromarray(photo)
    scale = longest / max(img.size)
    return np.asarray(img.resize((round(img.width * scale), round(img.height * scale)), Image.LANCZOS))


def make_demo_dataset(root=None, train_side: int = 256, test_side: int = 192, variants: int = 3) -> Path:
    """Writes the demo pairs under the cache once (seeded, so every machine makes the same set)."""
    root = Path(root or cache_dir("demo"))
    marker = root / f".complete-v{DEMO_VERSION}"
    if marker.exists():
        return root
    rng = np.random.default_rng(20240617)
    for split, names, side, count in (("train", DEMO_TRAIN, train_side, variants), ("test", DEMO_TEST, test_side, 1)):
        for name in names:
            high = _resize(_photo(name), side)
            for k in range(count):
                stem = f"{name}_{k}"
                write_image(root / split / "high" / f"{stem}.png", torch.from_numpy(high.copy()).permute(2, 0, 1) / 255)
                low = synthesise_low_light(high, rng)
                write_image(root / split / "low" / f"{stem}.png", torch.from_numpy(low).permute(2, 0, 1) / 255)
    marker.touch()
    return root
