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


# What `write_image` writes, by the output file's extension; every other extension is an error.
OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF"}
JPEG_QUALITY = 95  # with 4:4:4 chroma: the default 4:2:0 halves the colour resolution in 2x2 blocks
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _to_rgb(array: np.ndarray, path) -> np.ndarray:
    """(H, W, 3) from greyscale (H, W) or (H, W, 1), grey + alpha, RGB or RGBA."""
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 2, 3, 4):
        raise DataError(f"cannot read image {path}: pixel array of shape {array.shape} is not greyscale or RGB")
    if array.shape[-1] in (1, 2):
        return np.repeat(array[..., :1], 3, axis=-1)
    return array[..., :3]


def _png_bit_depth(path) -> int:
    """The bit depth in a PNG's header (byte 24: signature, IHDR length, type, width, height), 0 if
    the file is no PNG."""
    with open(path, "rb") as fh:
        head = fh.read(25)
    return head[24] if len(head) == 25 and head.startswith(_PNG_SIGNATURE) else 0


def _read_pixels(path) -> np.ndarray:
    """(H, W, 3) uint8, uint16 or float array: 16-bit PNG and TIFF keep all their bits (PIL reads
    an RGB 16-bit PNG as 8 bits)."""
    suffix = Path(path).suffix.lower() if isinstance(path, (str, os.PathLike)) else ""
    if suffix in (".tif", ".tiff"):
        import tifffile

        try:
            array = tifffile.imread(path)
        except Exception:  # noqa: BLE001 - e.g. LZW without imagecodecs: PIL decodes 8-bit ones
            with Image.open(path) as img:
                return np.asarray(img.convert("RGB"))
        if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[-1] not in (1, 2, 3, 4):
            array = np.moveaxis(array, 0, -1)  # planar TIFF: (C, H, W)
        return _to_rgb(array, path)
    if suffix == ".png" and _png_bit_depth(path) == 16:
        import png

        width, height, rows, info = png.Reader(filename=str(path)).asDirect()
        array = np.vstack([np.asarray(row, dtype=np.uint16) for row in rows])
        return _to_rgb(array.reshape(height, width, info["planes"]), path)
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def read_image(path) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1]; greyscale is repeated, alpha dropped. 8-bit images are divided
    by 255, 16-bit PNG and TIFF by 65535, float TIFF is taken as it is."""
    try:
        array = _read_pixels(path)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - the readers raise many types; the user needs the file name
        raise DataError(f"cannot read image {path}: {exc}") from exc
    if array.dtype == np.uint8:
        scale = 255
    elif array.dtype == np.uint16:
        scale = 65535
    elif array.dtype.kind == "f":
        scale = 1
    else:
        raise DataError(f"cannot read image {path}: pixels of type {array.dtype} (expected 8- or 16-bit or float)")
    return torch.from_numpy(np.array(array, dtype=np.float32)).permute(2, 0, 1) / scale


def image_bit_depth(path) -> int:
    """16 for a 16-bit or float PNG/TIFF, else 8: the depth `enhance` writes by default."""
    suffix = Path(path).suffix.lower()
    if suffix == ".png":
        return 16 if _png_bit_depth(path) == 16 else 8
    if suffix in (".tif", ".tiff"):
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                return 8 if tif.pages[0].dtype == np.uint8 else 16
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"cannot read image {path}: {exc}") from exc
    return 8


def output_format(path, bits: int = 8) -> str:
    """PIL's format name for an output path; DataError naming the path for an unknown extension or
    a depth the format cannot hold."""
    suffix = Path(path).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise DataError(f"{path}: unknown image extension {suffix or '(none)'!r}; "
                        f"known: {', '.join(sorted(OUTPUT_FORMATS))}")
    if bits not in (8, 16):
        raise DataError(f"{path}: bits must be 8 or 16, got {bits!r}")
    if bits == 16 and OUTPUT_FORMATS[suffix] == "JPEG":
        raise DataError(f"{path}: JPEG holds 8 bits per channel; use .png or .tif for 16 bits")
    return OUTPUT_FORMATS[suffix]


def write_image(path, image: torch.Tensor, bits: int = 8) -> None:
    """Saves a (3, H, W) image in [0, 1] in the format of the extension (PNG, JPEG or TIFF), with 8
    or 16 bits per channel, atomically (a crash leaves no half file)."""
    path = Path(path)
    fmt = output_format(path, bits)
    path.parent.mkdir(parents=True, exist_ok=True)
    scaled = image.detach().clamp(0, 1).mul(255 if bits == 8 else 65535).round().permute(1, 2, 0).cpu().numpy()
    array = scaled.astype(np.uint8 if bits == 8 else np.uint16)
    tmp = path.with_name(path.name + ".tmp")
    if fmt == "TIFF":
        import tifffile

        tifffile.imwrite(tmp, array, photometric="rgb", compression="zlib")
    elif bits == 16:
        import png

        height, width, _ = array.shape
        with open(tmp, "wb") as fh:
            png.Writer(width, height, greyscale=False, bitdepth=16).write(fh, array.reshape(height, width * 3))
    elif fmt == "JPEG":
        Image.fromarray(array).save(tmp, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    else:
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
