"""How good is a checkpoint's noise predictor at each step t? (the diagnosis behind model.sigma_data)

    python tools/noise_predictor.py runs/demo/checkpoints/last.pt [--split test] [--steps 1 5 20 50 80 100]

For each t it draws x_t from the true marginal p(x_t | x_0, mu) of the demo images (seeded), and
prints the mean squared error of the EMA network's eps_hat against the drawn noise, the same error
for the trivial predictor eps_hat = (x_t - mu) / sigmabar_t (exact when x_0 = mu, close at large t
where exp(-thetabar_t dt) is small), and the PSNR of x0_hat = mu + (x_t - mu - sigmabar_t eps_hat)
exp(thetabar_t dt) (clamped to [0, 1]). A network worse than the trivial predictor at large t has not
learnt the 1/sigmabar_t scale of the noise; its samples drift (docs/training.md).

Question: does the network predict the noise better than the trivial predictor at every t?
Answer for the demo: the paper's plain noise network did not (at t = 100, 270x worse), the
preconditioned one (model.sigma_data) does; recorded in docs/training.md (why model.sigma_data)
with the table in docs/notebook/2026-11-training-history.md. Kept: the same check applies to any
checkpoint.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from train.data import make_demo_dataset, read_image  # noqa: E402
from train.inference import load_for_sampling  # noqa: E402
from train.metrics import psnr  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--split", default="test", choices=["train", "test"], help="demo split to draw images from")
    parser.add_argument("--images", type=int, default=3, help="first N images of the split")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5, 20, 50, 80, 100])
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    network, sde, _ = load_for_sampling(args.checkpoint)
    root = make_demo_dataset() / args.split
    pairs = list(zip(sorted((root / "low").glob("*.png")), sorted((root / "high").glob("*.png"))))[: args.images]
    generator = torch.Generator().manual_seed(args.seed)
    print(f"{'t':>4} {'eps MSE':>10} {'trivial':>10} {'x0_hat PSNR':>12}")
    with torch.no_grad():
        for t in args.steps:
            errors, trivial, scores = [], [], []
            for low_path, high_path in pairs:
                low, high = read_image(low_path)[None], read_image(high_path)[None]
                t_vec = torch.full((1,), t, dtype=torch.long)
                x_t, noise = sde.sample_marginal(high, low, t_vec, generator)
                predicted = network(x_t, low, t_vec).float()
                errors.append(float((predicted - noise).pow(2).mean()))
                trivial.append(float(((x_t - low) / sde.marginal_std(t_vec).float() - noise).pow(2).mean()))
                scores.append(psnr(sde.x0_from_noise(x_t, low, predicted, t_vec).clamp(0, 1)[0], high[0]))
            n = len(pairs)
            print(f"{t:4d} {sum(errors) / n:10.2e} {sum(trivial) / n:10.2e} {sum(scores) / n:12.2f}")


if __name__ == "__main__":
    main()
