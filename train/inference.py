"""`enhance` and `evaluate`: posterior sampling with the EMA weights of a checkpoint.

Whole images of any size go through the network (it pads to a multiple of 2^levels and crops
back), or overlapping tiles of them when `sample.tile` is set (model/tiling.py). Evaluation
scores the low-light input and the enhanced output against the target, so every table shows what
the model added.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from model import IRSDE, TiledNetwork, build_noise_network

from .checkpoint import load_checkpoint
from .data import IMAGE_SUFFIXES, DataError, list_images, read_image, write_image
from .metrics import FID_UNAVAILABLE, optional_metrics, psnr, ssim


def load_for_sampling(checkpoint, device="cpu"):
    """(EMA network in eval mode, IRSDE, config) from a checkpoint, loaded with weights_only=True."""
    state = load_checkpoint(checkpoint, device)
    config = state["config"]
    sde = IRSDE(**config["sde"], device=device)
    network = build_noise_network(config["model"], sde)
    network.load_state_dict(state["ema"])
    return network.to(device).eval(), sde, config


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


def enhance_paths(network, sde, source, destination, device, sample_cfg, seed=0) -> list:
    """A file or a folder of low-light images to enhanced PNGs; returns the written paths."""
    source, destination = Path(source), Path(destination)
    if source.is_dir():
        inputs = list_images(source)
        targets = [destination / f"{p.stem}.png" for p in inputs]
    elif source.is_file() and source.suffix.lower() in IMAGE_SUFFIXES:
        inputs = [source]
        targets = [destination / f"{source.stem}.png" if destination.is_dir() or not destination.suffix else destination]
    else:
        raise DataError(f"input {source} is neither an image file nor a folder")
    for src, dst in tqdm(list(zip(inputs, targets)), desc="enhance"):
        write_image(dst, enhance_image(network, sde, read_image(src), device, sample_cfg, seed, progress=True))
    return targets
