"""The CUDA backend's kernels compiled for a GPU that is not here: registers, spills, SASS, loops.

nvcc compiles csrc/entropy_cuda.cu for a named target without a device, and the cuobjdump in
Triton's wheel reads the cubin, so each kernel's resources (registers per thread, which set how
many blocks share an SM; stack and local stores/loads, i.e. spills), its static SASS mix and its
loop nest (per-thread instruction counts of each loop body, inner loops in brackets; as in
benchmarks/triton_static.py) can be read on a CPU machine.

    python benchmarks/cuda_static.py                      # csrc/entropy_cuda.cu for sm_90
    python benchmarks/cuda_static.py --source old.cu      # another version, to compare
    python benchmarks/cuda_static.py --kernel backward_kernelIfLi4ELb1 --sass   # one kernel's SASS

Kernel names are the mangled template instances: forward_kernel<T, CPT> and backward_kernel<T,
CPT, FUSED> (If = float, Id = double; Li4 = 4 cells per thread, bins <= 32; Lb1 = fused). Static
counts are no timings: docs/cpp.md says how they were read.
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _triton_static():
    spec = importlib.util.spec_from_file_location("triton_static_loops", ROOT / "benchmarks" / "triton_static.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compile_cubin(source: Path, arch: int, out: Path):
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    cmd = [nvcc, "-cubin", "-std=c++17", "-O3", f"-arch=sm_{arch}", f"-I{ROOT / 'csrc'}", str(source), "-o", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr}")


def kernels(cubin: Path, tools: Path):
    """{short name: dict(resources, SASS mix, loops, sass text)} for every kernel in the cubin."""
    usage = subprocess.run([tools / "cuobjdump", "-res-usage", cubin], capture_output=True, text=True).stdout
    sass = subprocess.run([tools / "cuobjdump", "-sass", cubin], capture_output=True, text=True).stdout
    loop_nest = _triton_static().loop_nest
    resources = {}
    for m in re.finditer(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+)", usage):
        resources[m.group(1)] = tuple(map(int, m.groups()[1:]))
    out = {}
    for block in re.split(r"\n\s+Function : ", sass)[1:]:
        name = block.split("\n", 1)[0].strip()
        # From the kernel's name on (the anonymous namespace's mangled name before it depends on the
        # file's path and nvcc), without the parameter list.
        found_name = re.search(r"(?:forward|backward)_kernel\w*", name)
        short = re.sub(r"EEEvNS0_8Geometry\w*$", "", found_name.group(0) if found_name else name)
        instructions = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in re.finditer(
            r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)([^;]*);", block)]
        ops = collections.Counter(op for _, op, _ in instructions)
        regs, stack, shared = resources.get(name, (0, 0, 0))
        out[short] = dict(
            regs=regs, stack=stack, spill_st=ops["STL"], spill_ld=ops["LDL"], sass=sum(ops.values()),
            FFMA=ops["FFMA"], DFMA=ops["DFMA"] + ops["DADD"] + ops["DMUL"], LDS=ops["LDS"] + ops["LDS.64"],
            SHFL=ops["SHFL"], BAR=ops["BAR"], MUFU=ops["MUFU"], loops=loop_nest(instructions), text=block,
        )
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=ROOT / "csrc" / "entropy_cuda.cu")
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--kernel", help="print this kernel's SASS (a short name as in the table)")
    parser.add_argument("--sass", action="store_true")
    args = parser.parse_args()
    tools = _triton_static().TOOLS
    if not (tools / "cuobjdump").exists():
        sys.exit(f"cuobjdump not found under {tools} (it comes with the triton wheel)")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        compile_cubin(args.source, args.arch, cubin)
        found = kernels(cubin, tools)
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
