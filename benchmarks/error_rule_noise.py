"""How noisy the float32 error-bound rule's metric is, on single-pixel windows (tests/test_triton.py).

The rule compares the kernel's float32 error against the float64 reference with the reference's own
float32 error. On 1 x 1 windows every pixel is a window of its own, so the Triton kernel's gradient
is a'^T G b of one pixel; this script computes it in numpy float32 in the kernel's order of
operations (the Gaussian kernel at a bandwidth that is not a power of two, KL, bins 5, as
`ERROR_CASES[2]`), the reference in torch float32 and float64, on many random pixels, and prints
(1) the ratio of the two RMS errors over all of them (is the kernel less accurate?) and (2) the
distribution of that ratio over maps of 84 pixels, the test's size, unscaled and with each error
scaled by |exact| + the map's RMS (is the test's statistic noisy?).

    python benchmarks/error_rule_noise.py [--pixels 20000] [--seed 0]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from entropy_kernels import reference  # noqa: E402

BINS, BANDWIDTH, EPS, MAP = 5, 0.3, 1e-10, 84


def kernel_order(u, m, ut, mt, g, dt):
    """grad_u, grad_m of 1 x 1 windows as the Triton kernel forms them, in dtype dt."""
    centres = np.arange(BINS).astype(dt)
    h = dt(BANDWIDTH)

    def vectors(v):  # _kernel_vectors, Gaussian, h not a power of two
        z = (v.astype(dt)[:, None] - centres) / h
        k = np.exp(dt(-0.5) * z * z) / dt(dt(2.5066282746310002) * h)
        return k, (-z * k) / h

    a, da = vectors(u)
    b, db = vectors(m)
    at, _ = vectors(ut)
    bt, _ = vectors(mt)
    q, p = a[:, :, None] * b[:, None, :], at[:, :, None] * bt[:, None, :]
    G = (q - p) / (q + dt(EPS)) * g.astype(dt)[:, None, None]  # _window_g, N = 1
    gb = np.zeros_like(a)
    ag = np.zeros_like(a)
    for k in range(BINS):  # the dots' accumulation order
        gb = gb + b[:, k:k + 1] * G[:, :, k]
        ag = ag + a[:, k:k + 1] * G[:, k, :]
    return (da * gb).sum(1, dtype=dt), (db * ag).sum(1, dtype=dt)


def reference_grads(u, m, ut, mt, g, dtype):
    maps = [torch.tensor(x, dtype=dtype).view(1, 1, -1) for x in (u, m, ut, mt)]
    maps[0].requires_grad_()
    maps[1].requires_grad_()
    d = reference.local_divergence(*maps, 1, 1, False, BINS, BANDWIDTH, "gaussian", "kl", EPS)
    grads = torch.autograd.grad(d, maps[:2], torch.tensor(g, dtype=dtype).view(1, 1, -1))
    return [x.double().numpy().ravel() for x in grads]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pixels", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    # float32-representable inputs, as the test draws them
    u, m, ut, mt = (rng.random(args.pixels).astype(np.float32).astype(np.float64) * (BINS - 1) for _ in range(4))
    g = rng.standard_normal(args.pixels).astype(np.float32).astype(np.float64)
    exact = reference_grads(u, m, ut, mt, g, torch.float64)
    ref32 = reference_grads(u, m, ut, mt, g, torch.float32)
    ours = kernel_order(u, m, ut, mt, g, np.float32)
    check = kernel_order(u, m, ut, mt, g, np.float64)
    assert all(np.allclose(c, e, rtol=1e-12, atol=1e-12 * np.abs(e).max()) for c, e in zip(check, exact))
    maps = rng.permutation(args.pixels)[: args.pixels // MAP * MAP].reshape(-1, MAP)
    print(f"{args.pixels} single-pixel windows, Gaussian kernel, bandwidth {BANDWIDTH}, bins {BINS}, KL; "
          f"{len(maps)} maps of {MAP}")
    for name, e, r, o in zip(("grad_u", "grad_m"), exact, ref32, ours):
        mine, theirs = o.astype(np.float64) - e, r - e
        print(f"{name}: RMS error ratio kernel/reference over all windows {np.linalg.norm(mine) / np.linalg.norm(theirs):.3f}")
        for label, scale in (("unscaled", np.ones_like(e[maps])),
                             ("scaled", np.abs(e[maps]) + np.sqrt((e[maps] ** 2).mean(1, keepdims=True)))):
            rms = np.linalg.norm(mine[maps] / scale, axis=1) / np.linalg.norm(theirs[maps] / scale, axis=1)
            worst = np.abs(mine[maps] / scale).max(1) / np.abs(theirs[maps] / scale).max(1)
            print(f"  {label:8s} per map: RMS ratio median {np.median(rms):.2f}, 99th percentile "
                  f"{np.quantile(rms, 0.99):.2f}, above 2 in {(rms > 2).mean():.1%}; max ratio 99th percentile "
                  f"{np.quantile(worst, 0.99):.2f}, above 4 in {(worst > 4).mean():.1%}")


if __name__ == "__main__":
    main()
