"""Memory, time and output of `enhance` on a large image, whole and on tiles.

    python benchmarks/tiled_enhance.py --checkpoint runs/demo/checkpoints/last.pt --side 1024 --tiles 0 512 256

One of scikit-image's photographs (--photo) is resized to --side pixels on its longest side and
darkened with the demo's low-light synthesis (seeded); each tile size (0: the whole image) then
enhances it in a fresh subprocess with the same seed and --steps posterior steps, so that every
run starts from the same noise and its memory is measured alone: on the CPU the rise of the
child's peak resident set (VmHWM, reset before sampling) over its level then, on CUDA
torch.cuda.max_memory_allocated. Printed and written to tiled_enhance.csv under --out: seconds,
peak memory, PSNR/SSIM against the photograph, and PSNR of each tiled output against the
whole-image one (how much tiling changed it).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.tiling import POOLINGS  # noqa: E402
from train.data import _photo, _resize, synthesise_low_light  # noqa: E402
from train.inference import enhance_image, load_for_sampling  # noqa: E402
from train.metrics import psnr, ssim  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import PeakMemory, run_child  # noqa: E402


def pair(photo: str, side: int):
    """(low, high) as (3, H, W) float tensors in [0, 1]."""
    high = _resize(_photo(photo), side)
    low = synthesise_low_light(high, np.random.default_rng(7))
    return (torch.from_numpy(a.copy()).permute(2, 0, 1).float() / 255 for a in (low, high))


def run_one(args) -> None:
    """Child: enhance once with --tile, save the output, print one JSON line of measurements."""
    device = torch.device(args.device)
    network, sde, config = load_for_sampling(args.checkpoint, device)
    low, _ = pair(args.photo, args.side)
    sample = {**config["sample"], "steps": args.steps, "tile": args.tile or None, "tile_overlap": args.overlap,
              "tile_pooling": args.pooling}
    peak = PeakMemory(device)
    peak.start()
    start = time.perf_counter()
    with torch.no_grad():
        out = enhance_image(network, sde, low, device, sample, seed=args.seed)
    peak_mib = peak.extra() / 2**20
    seconds = time.perf_counter() - start
    torch.save(out, args.save)
    print(json.dumps({"tile": args.tile, "seconds": seconds, "peak_mib": peak_mib}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--photo", default="astronaut", help="a scikit-image photograph (default: astronaut)")
    parser.add_argument("--side", type=int, default=1024, help="longest side of the image (default 1024)")
    parser.add_argument("--tiles", type=int, nargs="+", default=[0, 512, 256], help="tile sides; 0: the whole image")
    parser.add_argument("--overlap", type=int, default=None, help="tile overlap (default: the library's)")
    parser.add_argument("--pooling", choices=POOLINGS, default="image",
                        help="what the network's global pools see on tiles: the image's means (default, two passes) or the tile's")
    parser.add_argument("--steps", type=int, default=10, help="posterior sampling steps (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--tile", type=int, help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.save:
        run_one(args)
        return 0

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    _, high = pair(args.photo, args.side)
    rows, outputs = [], {}
    for tile in args.tiles:
        save = out_dir / f"tiled_enhance_{tile}.pt"
        command = [sys.executable, __file__, "--checkpoint", args.checkpoint, "--photo", args.photo,
                   "--side", str(args.side), "--steps", str(args.steps), "--seed", str(args.seed),
                   "--device", args.device, "--pooling", args.pooling, "--tile", str(tile), "--save", str(save)]
        if args.overlap is not None:
            command += ["--overlap", str(args.overlap)]
        row = run_child(command)
        if "status" in row:
            print(row["status"], row["stderr"], sep="\n", file=sys.stderr)
            return 1
        outputs[tile] = torch.load(save)
        row.update(psnr=psnr(outputs[tile], high), ssim=ssim(outputs[tile], high))
        rows.append(row)
    whole = outputs.get(0)
    print(f"{args.photo} at {tuple(high.shape[1:])}, {args.steps} steps, {args.device}, pooling on tiles: {args.pooling}")
    print(f"{'tile':>6} {'seconds':>8} {'peak MiB':>9} {'PSNR':>7} {'SSIM':>7} {'PSNR vs whole':>14}")
    for row in rows:
        against = psnr(outputs[row["tile"]], whole) if whole is not None and row["tile"] else float("nan")
        row["psnr_vs_whole"] = against
        print(f"{row['tile'] or 'whole':>6} {row['seconds']:8.1f} {row['peak_mib']:9.0f} {row['psnr']:7.2f} "
              f"{row['ssim']:7.4f} {against:14.2f}")
    with open(out_dir / "tiled_enhance.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
