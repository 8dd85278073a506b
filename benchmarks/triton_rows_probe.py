"""A design probe: the 'slide' forward with R output rows per program, compiled for sm_90.

One program of the default 'slide' forward walks one output row; its column sums evaluate the four
kernel vectors of a 16-row chunk of which an 11 x 11 window uses 11 rows, then two dots. With R
output rows per program, R + 10 rows share one chunk (16 rows hold R <= 6): the kernel vectors are
evaluated once for R windows, and a batched (R, LP, 16) x (R, 16, LP) dot with each row's rows
masked gives the R column sums. The window states become (R, LP, LP) float64 tiles, R times the
registers. This script compiles that forward for R = 1, 2, 4 and prints registers, spills and the
per-thread instructions of one window (docs/triton.md, "Static resources"):

    python benchmarks/triton_rows_probe.py              # static counts, sm_90 (no GPU needed)
    python benchmarks/triton_rows_probe.py --check      # the probe against the reference, interpreted

It is a probe, not a backend: the library's kernels are in entropy_kernels/ops/triton_kde.py.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

CHECK = "--check" in sys.argv
if CHECK:
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: kernels bind at definition
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from entropy_kernels.ops.triton_kde import (  # noqa: E402,F401 - the probe's kernel calls them
    _is_finite, _kernel_setup, _kernel_vectors, _log, _window_cols)


@triton.jit
def _column_sums_rows(u_pred, m_pred, u_tgt, m_tgt, n, u0, u1, r0, r1, x, H, W, h, centres, bin_ok,
                      R: tl.constexpr, LP: tl.constexpr, KERNEL: tl.constexpr, BLOCK_P: tl.constexpr,
                      PRECISION: tl.constexpr, PRECISE_MATH: tl.constexpr):
    """Column x's joint sums (R, LP, LP) for R output rows, row j summing rows [r0[j], r1[j]), and
    their non-finite pixel counts; the kernel vectors of rows [u0, u1) are evaluated once for all R."""
    hp = tl.zeros((R, LP, LP), dtype=u_pred.dtype.element_ty)
    hq = tl.zeros((R, LP, LP), dtype=u_pred.dtype.element_ty)
    bad = tl.zeros((R,), dtype=tl.int32)
    for k0 in range(u0, u1, BLOCK_P):
        r = k0 + tl.arange(0, BLOCK_P)
        inside = r < u1
        offs = (n * H + r) * W + x
        up = tl.load(u_pred + offs, mask=inside, other=0.0)
        mp = tl.load(m_pred + offs, mask=inside, other=0.0)
        ut = tl.load(u_tgt + offs, mask=inside, other=0.0)
        mt = tl.load(m_tgt + offs, mask=inside, other=0.0)
        finite = inside & _is_finite(up) & _is_finite(mp) & _is_finite(ut) & _is_finite(mt)
        in_row = (r[None, :] >= r0[:, None]) & (r[None, :] < r1[:, None])  # (R, BLOCK_P)
        bad += tl.sum((in_row & (inside & ~finite)[None, :]).to(tl.int32), axis=1)
        keep = finite[:, None] & bin_ok[None, :]
        rows_keep = in_row[:, :, None] & keep[None, :, :]
        for pred in tl.static_range(2):
            a, _ = _kernel_vectors((up if pred else ut)[:, None], centres[None, :], h, False, KERNEL, PRECISE_MATH)
            b, _ = _kernel_vectors((mp if pred else mt)[:, None], centres[None, :], h, False, KERNEL, PRECISE_MATH)
            a3 = tl.permute(tl.where(rows_keep, a[None, :, :], 0.0), (0, 2, 1))
            b3 = tl.broadcast_to(tl.where(keep, b, 0.0)[None, :, :], (R, BLOCK_P, LP))
            if pred:
                hq = tl.dot(a3, b3, acc=hq, input_precision=PRECISION, out_dtype=hq.dtype)
            else:
                hp = tl.dot(a3, b3, acc=hp, input_precision=PRECISION, out_dtype=hp.dtype)
    return hp, hq, bad


@triton.jit
def _kde_divergence_fwd_rows(u_pred, m_pred, u_tgt, m_tgt, scalars, d_out, H, W, Ho, Wo, win_h, win_w, off_h,
                             off_w, BINS: tl.constexpr, KERNEL: tl.constexpr, DIVERGENCE: tl.constexpr,
                             BLOCK_P: tl.constexpr, LP: tl.constexpr, PRECISION: tl.constexpr,
                             PRECISE_MATH: tl.constexpr, R: tl.constexpr):
    """The 'slide' forward (triton_kde._kde_divergence_fwd_slide, KL only) for output rows
    R * k .. R * k + R - 1."""
    tl.static_assert(DIVERGENCE == 0, "the probe computes KL only")
    pid = tl.program_id(0)
    groups = tl.cdiv(Ho, R)
    n = pid // groups
    ho = (pid % groups) * R + tl.arange(0, R)
    live = ho < Ho
    top = ho - off_h
    r0 = tl.maximum(top, 0)
    r1 = tl.where(live, tl.minimum(top + win_h, H), r0)
    u0 = tl.min(r0, axis=0)
    u1 = tl.max(r1, axis=0)
    h, eps, centres, bin_ok, cell_ok = _kernel_setup(scalars, u_pred, BINS, LP)
    sp = tl.zeros((R, LP, LP), dtype=tl.float64)
    sq = tl.zeros((R, LP, LP), dtype=tl.float64)
    sbad = tl.zeros((R,), dtype=tl.int32)
    lo = u0 * 0
    hi = u0 * 0
    for c in range(0, Wo):
        first, end = _window_cols(c, W, win_w, off_w)
        for x in range(hi, end):
            cp, cq, cbad = _column_sums_rows(u_pred, m_pred, u_tgt, m_tgt, n, u0, u1, r0, r1, x, H, W, h, centres,
                                             bin_ok, R, LP, KERNEL, BLOCK_P, PRECISION, PRECISE_MATH)
            sp += cp.to(tl.float64)
            sq += cq.to(tl.float64)
            sbad += cbad
        for x in range(lo, first):
            cp, cq, cbad = _column_sums_rows(u_pred, m_pred, u_tgt, m_tgt, n, u0, u1, r0, r1, x, H, W, h, centres,
                                             bin_ok, R, LP, KERNEL, BLOCK_P, PRECISION, PRECISE_MATH)
            sp -= cp.to(tl.float64)
            sq -= cq.to(tl.float64)
            sbad -= cbad
        lo = tl.maximum(lo, first)
        hi = tl.maximum(hi, end)
        inv_n = 1.0 / ((r1 - r0) * (end - first)).to(tl.float64)
        p = (sp * inv_n[:, None, None]).to(u_pred.dtype.element_ty)
        q = (sq * inv_n[:, None, None]).to(u_pred.dtype.element_ty)
        # KL (the probe's only divergence), batched over the R windows.
        term = (p + eps) * (_log(p + eps, PRECISE_MATH) - _log(q + eps, PRECISE_MATH)) + q - p
        d = tl.sum(tl.sum(tl.where(cell_ok[None, :, :], term, 0.0), axis=2), axis=1)
        tl.store(d_out + (n * Ho + ho) * Wo + c, tl.where(sbad > 0, float("nan"), d), mask=live)


def launch(maps, d_out, win, bins, bandwidth, kernel, divergence, eps, rows_per_program):
    """Runs the probe on (N, H, W) maps, 'same' windows of side `win`, into d_out (N, H, W)."""
    from entropy_kernels.ops import triton_kde
    n, height, width = maps[0].shape
    constants = triton_kde._constants(bins, kernel, divergence, bandwidth)
    scalars = triton_kde._params(maps[0].device, maps[0].dtype, bandwidth, eps)
    config = triton_kde._slide_config(win, bins)  # BLOCK_P and LP as 'slide' launches them
    _kde_divergence_fwd_rows[(n * triton.cdiv(height, rows_per_program),)](
        *maps, scalars, d_out, height, width, height, width, win, win, win // 2, win // 2, **constants,
        BLOCK_P=config["BLOCK_P"], LP=config["LP"], R=rows_per_program)


def check():
    """The probe's D against the float64 reference for R = 1, 2, 4 (a 9 x 13 image: R does not divide it)."""
    import torch
    from entropy_kernels import reference
    gen = torch.Generator().manual_seed(0)
    maps = [torch.rand(2, 9, 13, generator=gen, dtype=torch.float64) * 11 for _ in range(4)]
    maps[1][1, 4, 6] = float("nan")
    options = (5, 5, False, 12, 0.5, "logistic", "kl", 1e-10)
    exact = reference.local_divergence(*maps, *options)
    worst = 0.0
    for rows in (1, 2, 4):
        d = torch.empty_like(maps[0])
        launch(maps, d, 5, 12, 0.5, "logistic", "kl", 1e-10, rows)
        torch.testing.assert_close(d, exact, rtol=1e-9, atol=1e-9, equal_nan=True)
        worst = max(worst, (d - exact).nan_to_num().abs().max().item())
    print(f"probe matches the float64 reference for R = 1, 2, 4 (worst difference {worst:.2e})")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="run the probe in Triton's interpreter against "
                                                             "the float64 reference instead of compiling it")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--warps", type=int, nargs="+", default=[8, 16])
    args = parser.parse_args()
    if args.check:
        return check()
    import triton_static
    from entropy_kernels.ops import triton_kde
    print("| rows per program | warps | registers | spill stores | per-window instructions per thread "
          "(outer loop body / rows) | loop nest |")
    print("|---|---|---|---|---|---|")
    for rows in args.rows:
        for warps in args.warps:
            config = triton_static.launch_config("slide", 32)  # BLOCK_P, LP (and num_warps, replaced)
            config.pop("num_warps")
            constants = dict(triton_kde._constants(32, "logistic", "kl", triton_static.BANDWIDTH), **config,
                             PRECISE_MATH=True, R=rows)  # PRECISE_MATH as the GPU launch sets it
            r = triton_static.compile_resources(_kde_divergence_fwd_rows, constants, "float32", warps)
            body = int(r["loops"].split("[", 2)[1].split("[")[0])
            print(f"| {rows} | {warps} | {r['regs']} | {r['spill_st']} | {body / rows:.0f} | {r['loops']} |", flush=True)


if __name__ == "__main__":
    main()
