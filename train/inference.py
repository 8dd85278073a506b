"""`enhance` and `evaluate`: posterior sampling with the EMA weights of a checkpoint or of an
exported weights file.

Whole images of any size go through the network (it pads to a multiple of 2^levels and crops
back), or overlapping tiles of them when `sample.tile` is set (model/tiling.py). Evaluation
scores the low-light input and the enhanced output against the target, so every table shows what
the model added.

From Python, :func:`load_enhancer` gives a callable that enhances image tensors and
:func:`enhance_file` enhances image files, as `python -m train enhance` does.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from model import IRSDE, TiledNetwork, build_noise_network

from .checkpoint import WEIGHTS_FORMAT
from .data import IMAGE_SUFFIXES, DataError, image_bit_depth, list_images, output_format, read_image, write_image
from .metrics import FID_UNAVAILABLE, optional_metrics, psnr, ssim

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive


def _reason(exc: Exception) -> str:
    """The first line of an exception's message (torch's and safetensors' go on for lines)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def read_weights(path) -> tuple:
    """(EMA weights, resolved config, training step or None) of a training checkpoint
    (train/checkpoint.py) or of an exported weights file (safetensors, metadata `format` =
    WEIGHTS_FORMAT). Everything stays on the CPU; a checkpoint is memory-mapped, so its model copy
    and AdamW moments are never read. DataError "<path>: <reason>" for any other file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as fh:
        head = fh.read(9)
    if head.startswith(_ZIP_MAGIC):
        return _read_checkpoint(path)
    if len(head) == 9 and head[8:9] == b"{":  # safetensors: 8-byte header length, then its JSON
        return _read_exported(path)
    raise DataError(f"{path}: neither a training checkpoint (a torch zip file) nor exported weights (safetensors)")


def _read_checkpoint(path: Path) -> tuple:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - truncated zips, foreign pickles: the user needs the file and why
        raise DataError(f"{path}: not a readable training checkpoint ({_reason(exc)})") from None
    if not isinstance(state, dict) or not isinstance(state.get("ema"), dict) or not isinstance(state.get("config"), dict):
        raise DataError(f"{path}: a torch file without the 'ema' weights and 'config' of a training checkpoint")
    return state["ema"], state["config"], state.get("step")


def _read_exported(path: Path) -> tuple:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = fh.metadata() or {}
            weights = {name: fh.get_tensor(name) for name in fh.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for every defect
        raise DataError(f"{path}: not a readable safetensors file ({_reason(exc)})") from None
    if metadata.get("format") != WEIGHTS_FORMAT:
        raise DataError(f"{path}: metadata format is {metadata.get('format')!r}, expected {WEIGHTS_FORMAT!r} "
                        "(the weights files of `python -m train export`)")
    try:
        config = json.loads(metadata["config"])
    except (KeyError, ValueError) as exc:
        raise DataError(f"{path}: metadata has no readable 'config' ({_reason(exc)})") from None
    step = metadata.get("step", "")
    return weights, config, int(step) if step.isdigit() else None


def _mismatch(network, weights: dict) -> str:
    """Why `weights` do not fit `network` ('' when they do), in one line."""
    expected = network.state_dict()
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    shapes = [f"{k} {tuple(weights[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in weights and weights[k].shape != v.shape]
    parts = [f"{label} {items[:3]}{' ...' if len(items) > 3 else ''}" for label, items in
             (("missing", missing), ("unexpected", unexpected), ("shape of", shapes)) if items]
    return "; ".join(parts)


def load_for_sampling(path, device="cpu"):
    """(EMA network in eval mode on `device`, IRSDE, config) from a training checkpoint or an exported
    weights file (see :func:`read_weights`). The weights are read on the CPU and only the network
    moves to the device."""
    weights, config, _ = read_weights(path)
    try:
        sde = IRSDE(**config["sde"])
        network = build_noise_network(config["model"], sde)
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: its config does not build a network ({type(exc).__name__}: {_reason(exc)})") from None
    reason = _mismatch(network, weights)
    if reason:
        raise DataError(f"{path}: its weights do not fit the network of its config: {reason}")
    network.load_state_dict(weights)
    return network.to(device).eval(), sde.to(device), config


def sample_settings(config: dict, **overrides) -> dict:
    """The run's `sample` section over the defaults (older runs have no tile keys), with the
    overrides that are not None on top (steps, method, tile, tile_overlap, tile_pooling);
    ValueError naming the key when they cannot work."""
    from .config import DEFAULTS, check_sample

    unknown = set(overrides) - set(DEFAULTS["sample"])
    if unknown:
        raise TypeError(f"unknown sampling settings {sorted(unknown)}; known: {sorted(DEFAULTS['sample'])}")
    sample = {**DEFAULTS["sample"], **config.get("sample", {}),
              **{key: value for key, value in overrides.items() if value is not None}}
    if not isinstance(sample["steps"], int) or isinstance(sample["steps"], bool) or sample["steps"] < 1:
        raise ValueError(f"sample.steps must be a positive integer, got {sample['steps']!r}")
    if sample["method"] not in ("posterior", "sde"):
        raise ValueError(f"sample.method must be 'posterior' or 'sde', got {sample['method']!r}")
    check_sample(sample)
    return sample


def set_threads(threads, config: dict):
    """Sets torch's CPU threads to `threads`, or to the run's `train.threads` when None; leaves
    torch's choice when both are unset. Returns the count now in force."""
    if threads is None:
        threads = config.get("train", {}).get("threads")
    if threads is not None:
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise ValueError(f"threads must be a positive integer, got {threads!r}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


class Enhancer:
    """A loaded model: ``enhancer(low)`` is the enhanced image of a low-light image tensor.

    ``low`` is float (3, H, W) or (N, 3, H, W) in [0, 1], on any device; the result has its shape,
    on the CPU, in [0, 1]. Every image is sampled with its own generator seeded by ``seed`` (the
    call's, else the enhancer's), so an image's result does not depend on what else is in the batch.
    Attributes: ``network``, ``sde``, ``config`` (the run's resolved config), ``sample`` (the
    sampling settings in force) and ``device``.
    """

    def __init__(self, network, sde, config: dict, sample: dict, device, seed: int = 0):
        self.network, self.sde, self.config, self.sample = network, sde, config, sample
        self.device, self.seed = torch.device(device), seed

    def __call__(self, low: torch.Tensor, seed=None, progress: bool = False) -> torch.Tensor:
        if not torch.is_tensor(low) or not low.is_floating_point() or low.dim() not in (3, 4) or low.shape[-3] != 3:
            raise ValueError("low must be a float tensor (3, H, W) or (N, 3, H, W) in [0, 1], got "
                             + (f"{low.dtype} {tuple(low.shape)}" if torch.is_tensor(low) else type(low).__name__))
        seed = self.seed if seed is None else seed
        images = low.unsqueeze(0) if low.dim() == 3 else low
        out = torch.stack([enhance_image(self.network, self.sde, image.float(), self.device, self.sample, seed, progress)
                           for image in images])
        return out[0] if low.dim() == 3 else out


def load_enhancer(path, device=None, *, seed: int = 0, threads=None, **sample) -> Enhancer:
    """An :class:`Enhancer` from a training checkpoint or an exported weights file.

    Args:
        path: ``runs/<run>/checkpoints/last.pt`` (only its EMA weights and config are read) or a
            ``.safetensors`` file written by ``python -m train export``.
        device: where the network runs (default: CUDA when available, else the CPU).
        seed: seeds the sampling noise of every image.
        threads: torch's CPU threads for the whole process (``torch.set_num_threads``); default None
            leaves the process's setting.
        **sample: sampling settings over the run's ``sample`` section: ``steps``, ``method``
            ('posterior' or 'sde'), ``tile``, ``tile_overlap``, ``tile_pooling``.

    Raises:
        DataError (a ValueError): the file is missing, truncated or of an unknown kind, or its
            weights do not fit its config; the message starts with the path.
        ValueError: a sampling setting or ``threads`` that cannot work, naming it.

    Example::

        enhance = train.load_enhancer("runs/demo/checkpoints/last.pt", "cpu", steps=20)
        bright = enhance(train.read_image("low.png"))      # (3, H, W) in [0, 1]
        train.write_image("bright.png", bright)
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    network, sde, config = load_for_sampling(path, device)
    settings = sample_settings(config, **sample)
    if threads is not None:
        set_threads(threads, config)
    return Enhancer(network, sde, config, settings, device, seed)


def enhance_file(path, source, destination, *, device=None, bits=None, seed: int = 0, threads=None,
                 **sample) -> list:
    """Enhances an image file, or every image of a folder, with the weights at ``path``; returns the
    written paths. The arguments are those of :func:`load_enhancer` and :func:`enhance_paths`."""
    enhancer = load_enhancer(path, device, seed=seed, threads=threads, **sample)
    return enhance_paths(enhancer, source, destination, bits)


def enhance_image(network, sde, low: torch.Tensor, device, sample_cfg: dict, seed: int = 0,
                  progress: bool = False) -> torch.Tensor:
    """The enhanced (3, H, W) image of one low-light (3, H, W) image (network on tiles when
    ``sample_cfg['tile']`` is set)."""
    generator = torch.Generator(device).manual_seed(seed)
    mu = low.to(device).unsqueeze(0)
    if sample_cfg.get("tile"):
        network = TiledNetwork(network, sample_cfg["tile"], sample_cfg.get("tile_overlap"),
                               sample_cfg.get("tile_pooling", "image"))
    out = sde.sample(network, mu, steps=int(sample_cfg["steps"]), method=sample_cfg["method"], generator=generator,
                     progress=progress)
    return out[0].cpu()


def evaluate_pairs(network, sde, pairs, device, sample_cfg, seed=0, outputs_dir=None, progress=False) -> dict:
    """PSNR/SSIM of input and output for every (low, high) pair, and their means; outputs kept in memory."""
    rows, images = [], []
    was_training = network.training
    network.eval()
    for low_path, high_path in tqdm(pairs, desc="enhance", disable=not progress):
        low, high = read_image(low_path), read_image(high_path)
        if low.shape != high.shape:
            raise DataError(f"{low_path} is {tuple(low.shape[1:])} but its pair {high_path} is {tuple(high.shape[1:])}")
        out = enhance_image(network, sde, low, device, sample_cfg, seed, progress=progress)
        if outputs_dir is not None:
            write_image(Path(outputs_dir) / f"{Path(low_path).stem}.png", out)
        rows.append({
            "image": Path(low_path).name,
            "input": {"psnr": psnr(low, high), "ssim": ssim(low, high)},
            "output": {"psnr": psnr(out, high), "ssim": ssim(out, high)},
        })
        images.append((low, out, high))
    network.train(was_training)
    mean = {side: {k: sum(r[side][k] for r in rows) / len(rows) for k in ("psnr", "ssim")} for side in ("input", "output")}
    return {"images": rows, "mean": mean, "_images": images}


def comparison_grid(images) -> torch.Tensor:
    """One row per image: input | output | target, rows padded to the widest."""
    rows = [torch.cat(triple, dim=2) for triple in images]
    width = max(r.shape[2] for r in rows)
    return torch.cat([F.pad(r, (0, width - r.shape[2]), value=1.0) for r in rows], dim=1)


def format_table(result: dict) -> str:
    lines = [f"{'image':<28} {'PSNR in':>8} {'PSNR out':>9} {'SSIM in':>8} {'SSIM out':>9}"]
    for row in result["images"] + [{"image": "mean", **result["mean"]}]:
        i, o = row["input"], row["output"]
        lines.append(f"{row['image']:<28} {i['psnr']:8.2f} {o['psnr']:9.2f} {i['ssim']:8.4f} {o['ssim']:9.4f}")
    for name, value in result["extra"].items():
        lines.append(f"{name}: {value if isinstance(value, str) else f'{value:.4f}'}")
    return "\n".join(lines)


def run_evaluation(network, sde, pairs, out_dir, device, sample_cfg, seed=0) -> dict:
    """Enhances the pairs, prints the table and writes outputs/, results.json and grid.png under out_dir."""
    out_dir = Path(out_dir)
    result = evaluate_pairs(network, sde, pairs, device, sample_cfg, seed, out_dir / "outputs", progress=True)
    images = result.pop("_images")
    result["extra"] = optional_metrics(images, device)
    result["extra"]["fid"] = FID_UNAVAILABLE
    write_image(out_dir / "grid.png", comparison_grid(images))
    with open(out_dir / "results.json", "w") as f:
        json.dump(result, f, indent=2)
    print(format_table(result))
    return result


def enhance_paths(enhancer: Enhancer, source, destination, bits=None, progress: bool = False) -> list:
    """A file or a folder of low-light images to enhanced images; returns the written paths.

    A file goes to ``destination`` in the format of its extension (.png, .jpg/.jpeg, .tif/.tiff),
    or to ``destination/<stem>.png`` when ``destination`` is a folder or has no extension; a folder
    goes to ``destination/<stem>.png`` per image. ``bits`` (8 or 16) is the depth of PNG and TIFF
    outputs; by default each output has its input's (16 for 16-bit PNG and TIFF). Every output path
    is checked before the first image is sampled."""
    source, destination = Path(source), Path(destination)
    if source.is_dir():
        inputs = list_images(source)
        targets = [destination / f"{p.stem}.png" for p in inputs]
    elif source.is_file() and source.suffix.lower() in IMAGE_SUFFIXES:
        inputs = [source]
        targets = [destination / f"{source.stem}.png" if destination.is_dir() or not destination.suffix else destination]
    else:
        raise DataError(f"{source}: neither an image file nor a folder")
    # JPEG is 8-bit only: a 16-bit input written as .jpg is not an error unless 16 bits were asked for
    depths = [bits or (8 if output_format(dst) == "JPEG" else image_bit_depth(src)) for src, dst in zip(inputs, targets)]
    for dst, depth in zip(targets, depths):
        output_format(dst, depth)
    for src, dst, depth in tqdm(list(zip(inputs, targets, depths)), desc="enhance", disable=not progress):
        write_image(dst, enhancer(read_image(src), progress=progress), depth)
    return targets
