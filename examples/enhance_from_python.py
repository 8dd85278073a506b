"""Enhance a low-light image from Python with a trained checkpoint or an exported weights file.

    python -m train fit --config configs/demo.yaml       # writes runs/demo/checkpoints/last.pt
    python examples/enhance_from_python.py runs/demo/checkpoints/last.pt low.png bright.png

`train.load_enhancer` reads only the EMA weights and the run's config (on the CPU; only the network
moves to the device) and returns a callable on image tensors, for use inside your own code;
`train.enhance_file` is the one-call form for files (what `python -m train enhance` does).
"""
import argparse

import torch

import train


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights", help="a training checkpoint (.pt) or an exported .safetensors file")
    parser.add_argument("input", help="a low-light image (PNG, JPEG or TIFF, 8 or 16 bits)")
    parser.add_argument("output", help="where the enhanced image goes; the extension picks the format")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the run's)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args(argv)

    # Load once, enhance many: the enhancer takes (3, H, W) or (N, 3, H, W) float tensors in [0, 1].
    enhance = train.load_enhancer(args.weights, args.device, steps=args.steps, seed=0)
    low = train.read_image(args.input)
    with torch.inference_mode():
        bright = enhance(low)
    train.write_image(args.output, bright)
    print(f"{args.input} -> {args.output}: mean brightness {low.mean():.3f} -> {bright.mean():.3f} "
          f"({enhance.sample['steps']} sampling steps on {enhance.device})")

    # The same in one call, for files or whole folders:
    #     train.enhance_file(args.weights, args.input, args.output, steps=args.steps)


if __name__ == "__main__":
    main()
