"""The CUDA backend's kernels compiled for a GPU that is not here: registers, spills, SASS, loops.

nvcc compiles csrc/entropy_cuda.cu for a named target without a device, and the cuobjdump in
Triton's wheel reads the cubin, so each kernel's resources (registers per thread, which set how
many blocks share an SM; stack and local stores/loads, i.e. spills), its static SASS mix and its
loop nest (per-thread instruction counts of each loop body, inner loops in brackets; read by
tools/sass.py, as for the Triton kernels) can be read on a CPU machine.

    python tools/cuda_static.py                      # csrc/entropy_cuda.cu for sm_90
    python tools/cuda_static.py --source old.cu      # another version, to compare
    python tools/cuda_static.py --kernel backward_kernelIfLi4ELb1ELb0 --sass   # one kernel's SASS

Kernel names are the mangled template instances: forward_kernel<T, CPT, TC> and backward_kernel<T,
CPT, FUSED, TC> (If = float, Id = double; Li4 = 4 cells per thread, bins <= 32; FUSED Lb1 = fused;
TC Lb1 = the opt-in tensor-core column sums, docs/tensor_cores.md). Static counts are no timings:
docs/cuda.md says how they were read.
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import sass  # noqa: E402


def compile_cubin(source: Path, arch: int, out: Path, defines=()):
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    sass.run(nvcc, "-cubin", "-std=c++17", "-O3", f"-arch=sm_{arch}", f"-I{ROOT / 'csrc'}",
             *(f"-D{d}" for d in defines), source, "-o", out)


def kernels(cubin: Path):
    """{short name: dict(resources, SASS mix, loops, sass text)} for every kernel in the cubin."""
    usage = sass.run(sass.TOOLS / "cuobjdump", "-res-usage", cubin)
    listing = sass.run(sass.TOOLS / "cuobjdump", "-sass", cubin)
    resources = {}
    for m in re.finditer(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+)", usage):
        resources[m.group(1)] = tuple(map(int, m.groups()[1:]))
    out = {}
    for block in re.split(r"\n\s+Function : ", listing)[1:]:
        name = block.split("\n", 1)[0].strip()
        # From the kernel's name on (the anonymous namespace's mangled name before it depends on the
        # file's path and nvcc), without the parameter list.
        found_name = re.search(r"(?:forward|backward)_kernel\w*", name)
        short = re.sub(r"EEEvNS0_8Geometry\w*$", "", found_name.group(0) if found_name else name)
        instructions = sass.instructions(block)
        ops = sass.opcode_counts(instructions)  # opcodes without their suffixes: LDS counts LDS.64 too
        regs, stack, _ = resources.get(name, (0, 0, 0))
        out[short] = dict(
            regs=regs, stack=stack, spill_st=ops["STL"], spill_ld=ops["LDL"], sass=sum(ops.values()),
            FFMA=ops["FFMA"], DFMA=ops["DFMA"] + ops["DADD"] + ops["DMUL"], LDS=ops["LDS"], SHFL=ops["SHFL"],
            BAR=ops["BAR"], MUFU=ops["MUFU"], loops=sass.loop_nest(instructions), text=block,
        )
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=ROOT / "csrc" / "entropy_cuda.cu")
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--kernel", help="print this kernel's SASS (a short name as in the table)")
    parser.add_argument("--sass", action="store_true")
    parser.add_argument("--target-path", action="store_true",
                        help="build with EK_STATIC_PATH: the tensor-core step takes the target case's branches "
                             "(logistic, kl, bandwidth 0.5, column ring) as constants, so that its static count "
                             "is the path that case runs")
    args = parser.parse_args()
    if sass.TOOLS is None or not (sass.TOOLS / "cuobjdump").exists():
        sys.exit(f"cuobjdump not found under {sass.TOOLS} (it comes with the triton wheel)")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        compile_cubin(args.source, args.arch, cubin, ["EK_STATIC_PATH"] if args.target_path else [])
        found = kernels(cubin)
    if args.kernel:
        print(found[args.kernel]["text"] if args.sass else found[args.kernel]["loops"])
        return
    fields = ["regs", "stack", "spill_st", "spill_ld", "sass", "FFMA", "DFMA", "LDS", "SHFL", "BAR", "MUFU"]
    print("kernel," + ",".join(fields) + ",loops")
    for name in sorted(found):
        k = found[name]
        print(name + "," + ",".join(str(k[f]) for f in fields) + "," + k["loops"])


if __name__ == "__main__":
    main()
