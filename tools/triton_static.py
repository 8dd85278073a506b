"""The Triton kernels compiled for a GPU that is not here: registers, spills, shared memory, SASS.

Triton compiles for a named target without a device (its wheel carries ptxas and cuobjdump), so
what a kernel costs in resources can be read on a CPU machine: registers per thread (which set how
many programs share an SM), the stack frame and local stores/loads (register spills), shared memory,
and the static SASS instruction mix. Each configuration is the one the backend launches
(`triton_kde._slide_config` / `_launch_config` for an 11 x 11 window on 128-pixel rows).

    python tools/triton_static.py                   # table for sm_90 (H100 / H200)
    python tools/triton_static.py --warps 4 8 16    # the same with num_warps overridden
    python tools/triton_static.py --precision tf32x3   # tensor-core dots instead of IEEE FMA ones
    python tools/triton_static.py --maxnreg 128     # registers capped (two 8-warp programs per SM)
    python tools/triton_static.py --check           # CI: every launched configuration compiles
                                                         # for sm_90, and the default algorithm's
                                                         # float32 ones with bins <= 32 do not spill

Static counts are no timings: they say where a kernel cannot be fast (spills, one program per SM),
not how fast it is. docs/triton.md keeps the table.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# Compiled kernels, not the interpreter's: Triton binds a kernel to the interpreter at definition.
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's current default, stated (silences a warning)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import sass  # noqa: E402
from entropy_kernels.ops import triton_kde  # noqa: E402

TOOLS = sass.TOOLS
POINTERS = {"u_pred", "m_pred", "u_tgt", "m_tgt", "scalars", "d_out", "d_saved", "grad_d", "grad_u", "grad_m"}
KERNELS = {
    ("slide", "fwd"): "_kde_divergence_fwd_slide", ("slide", "bwd"): "_kde_divergence_bwd_slide",
    ("slide", "fused"): "_kde_divergence_bwd_slide",  # the forward when a gradient will be needed
    ("strip", "fwd"): "_kde_divergence_fwd", ("strip", "bwd"): "_kde_divergence_bwd",
}
DTYPES = {"float32": "fp32", "float64": "fp64"}
WINDOW, ROW = 11, 128
MAXNREG = None  # --maxnreg: a register cap for every compiled kernel
PRECISION = triton_kde.DOT_PRECISION  # --precision: the dots' input_precision
DEFAULT_ALGORITHM = triton_kde._Variant().algorithm
BANDWIDTH = 0.5  # the default: a power of two (see triton_kde._reciprocal_h)
FIELDS = ["algorithm", "pass", "dtype", "bins", "LP", "BLOCK_P", "warps", "regs", "stack", "spill_st",
          "spill_ld", "shared", "sass", "FFMA", "DFMA+DADD", "MUFU", "LDS", "programs_per_sm"]


def tools_missing():
    """Why this machine cannot compile for a GPU (None when it can)."""
    missing = [t for t in ("ptxas", "cuobjdump") if not (TOOLS / t).exists()]
    return f"Triton's NVIDIA tools not found: {', '.join(missing)} under {TOOLS}" if missing else None


def launch_config(algorithm, bins, warps=None):
    """(constexprs and launch options) the backend uses for an 11 x 11 window, bins `bins`."""
    if algorithm == "slide":
        config = triton_kde._slide_config(WINDOW, bins)
    else:
        config = triton_kde._launch_config(WINDOW, WINDOW, ROW, bins)
        config.pop("per_strip")
    if warps is not None:
        config["num_warps"] = warps
    return config


def compile_kernel(algorithm, direction, dtype, bins, kernel="logistic", divergence="kl", warps=None, arch=90):
    """Compiles one kernel for sm_<arch> and returns its row of FIELDS."""
    fn = getattr(triton_kde, KERNELS[algorithm, direction])
    config = launch_config(algorithm, bins, warps)
    num_warps = config.pop("num_warps")
    maxnreg = config.pop("maxnreg", MAXNREG)
    variant = triton_kde._Variant(precision=PRECISION, precise_math=True)
    constants = dict(triton_kde._constants(bins, kernel, divergence, BANDWIDTH, variant), **config)
    if "FUSED" in fn.arg_names:  # a constexpr with a default, which the signature must name
        constants["FUSED"] = direction == "fused"
    return dict(algorithm=algorithm, **{"pass": direction}, dtype=dtype, bins=bins, LP=constants["LP"],
                BLOCK_P=constants["BLOCK_P"], **compile_resources(fn, constants, dtype, num_warps, arch, maxnreg))


def compile_resources(fn, constants, dtype, num_warps, arch=90, maxnreg=None):
    """Compiles the Triton function `fn` (pointer arguments named as in POINTERS, the others int32
    or in `constants`) for sm_<arch>, registers capped at maxnreg if given: warps, registers,
    spills, shared memory, SASS mix, loop nest."""
    signature = {name: "constexpr" if name in constants else ("*" + DTYPES[dtype] if name in POINTERS else "i32")
                 for name in fn.arg_names}
    source = ASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in constants.items()})
    options = dict(num_warps=num_warps) if maxnreg is None else dict(num_warps=num_warps, maxnreg=maxnreg)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = sass.run(TOOLS / "cuobjdump", "-res-usage", cubin)
        listing = sass.instructions(sass.run(TOOLS / "cuobjdump", "-sass", cubin))
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", usage)
    if not found:
        raise RuntimeError(f"cuobjdump -res-usage gave no resource line:\n{usage}")
    regs, stack, shared = map(int, found.groups())
    ops = sass.opcode_counts(listing)
    threads = 32 * num_warps
    # An SM has 64K registers, allocated per warp in units of 256 (8 registers per thread).
    per_warp = -(-regs * 32 // 256) * 256
    return dict(warps=num_warps, regs=regs, stack=stack, spill_st=ops["STL"], spill_ld=ops["LDL"], shared=shared,
                sass=sum(ops.values()), FFMA=ops["FFMA"], **{"DFMA+DADD": ops["DFMA"] + ops["DADD"]},
                MUFU=ops["MUFU"], LDS=ops["LDS"], programs_per_sm=min(65536 // (per_warp * num_warps), 2048 // threads),
                loops=sass.loop_nest(listing))


def _set_options(precision, maxnreg):
    global MAXNREG, PRECISION
    PRECISION = precision or triton_kde.DOT_PRECISION
    MAXNREG = maxnreg


def _job(args):
    try:
        return compile_kernel(*args[:6], warps=args[6])
    except Exception as exc:  # noqa: BLE001 - a configuration that fails to compile is a result
        algorithm, direction, dtype, bins, kernel, divergence, warps = args
        return dict(algorithm=algorithm, **{"pass": direction}, dtype=dtype, bins=bins, warps=warps,
                    failed=f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}")


def jobs(check, warps_list):
    """(algorithm, pass, dtype, bins, kernel, divergence, warps) to compile."""
    out = []
    for warps in warps_list:
        for algorithm in triton_kde.ALGORITHMS:
            for direction in ("fwd", "bwd", "fused") if algorithm == "slide" else ("fwd", "bwd"):
                for dtype in DTYPES:
                    for bins in (8, 32, 64):
                        if check and algorithm != DEFAULT_ALGORITHM and (dtype, bins) != ("float32", 32):
                            continue  # CI: the default algorithm whole, the other one at the target case
                        out.append((algorithm, direction, dtype, bins, "logistic", "kl", warps))
    if check:
        # The Gaussian kernel and Hellinger divergence branches compile too (the other constexprs).
        out += [(DEFAULT_ALGORITHM, d, "float32", 32, "gaussian", "hellinger", None) for d in ("fwd", "bwd", "fused")]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 unless every configuration compiles and "
                        "the default algorithm's float32 ones with bins <= 32 do not spill")
    parser.add_argument("--warps", type=int, nargs="*", default=[None], help="override num_warps")
    parser.add_argument("--loops", action="store_true", help="print each kernel's loop nest: per-thread "
                        "instruction counts, a loop's inner loops in brackets")
    parser.add_argument("--precision", choices=("ieee", "tf32", "tf32x3"), help="override the dots' "
                        f"input_precision (default {triton_kde.DOT_PRECISION!r})")
    parser.add_argument("--maxnreg", type=int, help="cap the registers per thread (ptxas), as the "
                        "'slide-maxnreg128' variant of triton_variants.py launches")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()
    reason = tools_missing()
    if reason:
        print(reason)
        return 1 if args.check else 0
    todo = jobs(args.check, args.warps)
    with ProcessPoolExecutor(args.workers, initializer=_set_options, initargs=(args.precision, args.maxnreg)) as pool:
        rows = list(pool.map(_job, todo))
    cap = f", registers capped at {args.maxnreg}" if args.maxnreg else ""
    print(f"sm_90, window {WINDOW}, Triton {triton.__version__}{cap}; stack/spill_st/spill_ld: bytes and local "
          "store/load instructions (register spills); sass: static instruction count")
    print(" | ".join(FIELDS))
    problems = []
    for row, job in zip(rows, todo):
        if "failed" in row:
            problems.append(f"{job}: {row['failed']}")
            print(f"{job}: FAILED {row['failed']}")
            continue
        print(" | ".join(str(row[k]) for k in FIELDS) + ("" if job[4:6] == ("logistic", "kl") else f" ({job[4]}, {job[5]})"))
        if args.loops:
            print(f"    loops: {row['loops']}")
        launched = row["algorithm"] == DEFAULT_ALGORITHM and job[6] is None
        if launched and row["dtype"] == "float32" and row["bins"] <= 32 and row["spill_st"]:
            problems.append(f"{job}: {row['spill_st']} spill stores")
    if args.check and problems:
        print("\n".join(["CHECK FAILED:"] + problems))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
